"""Samplers: next-scale generation (:mod:`.medvar`), reverse diffusion for the DDPM baseline
(:mod:`.ddpm`), and the classifier-free guidance they share (:mod:`.guidance`)."""
