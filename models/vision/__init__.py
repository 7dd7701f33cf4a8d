"""Vision: untrusted image input, CLIP / SigLIP towers, the LLaVA projector and composition."""
