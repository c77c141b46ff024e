"""The trainable VAE and its losses for end-to-end (REPA-E) training.

sdvae: diffusers AutoencoderKL in the SD-VAE f8d4 layout, loaded from local files (also
       REPA-E's LDM-layout sdvae-f8d4.pt); lpips: the VGG16 LPIPS distance;
discriminator: the PatchGAN; losses: L1 + LPIPS + KL + hinge GAN with REPA-E's weights.
"""
