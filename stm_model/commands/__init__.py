"""What each `stm` sub-command does, one module per command (common: what they share).

The parsers, the error types and the dispatch are in stm_model.cli, which imports a command's
module only once its arguments are parsed: these modules import torch, and `stm --help` does
not wait for it.
"""
