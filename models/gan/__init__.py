"""Generative models: the class-conditional DCGAN (`dcgan`), the training loop of two-network
models (`loop`), the trained generators found, trained and cached (`generators`: AdvGAN's
per target model, the DCGAN's) and what measures the samples (`quality`)."""
