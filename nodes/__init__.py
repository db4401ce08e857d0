"""ComfyUI V3 node classes of the pack. Nodes declare and wire; no math lives here."""
