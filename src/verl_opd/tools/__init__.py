"""User-facing commands: ``verl-opd`` (cli), the demo and the doctor."""
