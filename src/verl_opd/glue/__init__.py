"""The thin layer that plugs OPD into an unmodified verl 0.9.1.

The ``verl.plugins`` entry point (:mod:`verl_opd.glue.plugin`), the registered
advantage estimator, the trainer and teacher-worker subclasses, the driver that
fills verl's config, and the one guarded module of patches.
"""
