"""OPD trainer: being written."""
