"""InDetail-IP (Jo et al., "Devil is in the Detail"): reference self-attention over a
DDIM-inverted image prompt, conflict-free guidance, Stratified Attention, AdaIN noise."""
