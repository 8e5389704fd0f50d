"""Pure Triton kernels and their launchers, installed as manualbp.triton_kernels."""
