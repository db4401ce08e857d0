"""Model families: for each kind of diffusion model ComfyUI runs (UNets; Flux.1, Chroma and
Flux 2; SD3/SD3.5), which tokens of an attention call are text and which image, the image
grid, the attention layers and how block specs name them (``registry.family_of``)."""
