"""The fused read inside other projects' segmenters, one call away.

Each module patches one installed package so that its model reads memory with
`stm_kernels.memory_read` instead of materialising the (N x HW) affinity:

- `stm_kernels.integrations.cutie`: Cutie (`pip install "/path/to/stm-kernels[cutie]"` from a
  clone, the rf-cutie fork): `use_fused_read(processor or network)`, or `with fused_read(...):`.
- `stm_kernels.integrations.stcn`: STCN (`pip install "/path/to/stm-kernels[stcn]"`, the
  stcnbuf fork).

Nothing here is imported by `import stm_kernels`; each module imports its package only when
called, and refuses (naming the installed version) a package whose functions it does not know.
"""
