"""Pure Triton kernels and their launchers, installed as manualbp.triton_kernels.

One kernel family per module, each with the math in its docstring and its launcher after it:

    activations        f and f′ as device functions, selected by a constexpr id
    linear_forward     z = x Wᵀ + b, a = f(z)                      (bias + f in the epilogue)
    linear_grad_input  grad_input = (grad_out ⊙ f′) W [⊙ f′_prev]  (δ in the prologue)
    linear_grad_weight grad_weight = δᵀ x, grad_bias = Σ δ         (split over M, deterministic)
    delta              δ = grad_out ⊙ f′(saved), once
    aot                ahead-of-time compilation of every variant (python -m ...aot)

No autograd and no nn.Module here: manualbp.backends.triton wires these into the library.
Importing the submodules imports triton; this package itself does not.
"""
