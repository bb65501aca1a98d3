"""OPD's configuration: the typed ``opd.*`` schema and the Hydra config verl composes.

``opd_trainer.yaml`` here is found through ``pkg://verl_opd.config``
(see ``hydra_plugins/verl_opd_searchpath``).
"""
