"""The presets for LAION's public models: valid configs that describe real architectures.

The weights are on the Hugging Face hub, out of reach here; the architectures are built from
the hyperparameters published with them (see ../shared/reference/FACTS.md) on the meta device,
which allocates nothing, to check their size and what loading them costs.
"""

from __future__ import annotations

import torch
from dalle2_pytorch import Decoder, DiffusionPrior, DiffusionPriorNetwork, Unet

from dalle2_cli.config import load_config

LAION_UNET = dict(
    dim=320,
    image_embed_dim=768,
    text_embed_dim=768,
    cond_dim=512,
    channels=3,
    dim_mults=(1, 2, 3, 4),
    num_resnet_blocks=4,
    attn_heads=8,
    attn_dim_head=64,
    sparse_attn=True,
    memory_efficient=True,
    cond_on_text_encodings=True,
    self_attn=[False, True, True, True],
)
LAION_PRIOR_NET = dict(
    dim=768,
    depth=24,
    num_timesteps=1000,
    max_text_len=77,
    num_time_embeds=1,
    num_image_embeds=1,
    num_text_embeds=1,
    dim_head=64,
    heads=32,
    ff_mult=4,
    attn_dropout=0.05,
    ff_dropout=0.05,
    normformer=True,
)


def test_presets_point_at_laions_files():
    plain = load_config("laion-1.5B")
    assert plain.clip.make == "openai" and plain.clip.model == "ViT-L/14"
    assert plain.prior.load_model_from.path.endswith("laion/DALLE2-PyTorch/resolve/main/prior/latest.pth")
    assert plain.prior.load_model_from.checksum_file_path.endswith("laion/DALLE2-PyTorch/raw/main/prior/latest.pth")
    (decoder,) = plain.decoder.unet_sources
    assert decoder.load_model_from.path.endswith("decoder/1.5B_laion2B/latest.pth")
    assert decoder.load_config_from.path.endswith("decoder/1.5B_laion2B/decoder_config.json")
    upsampled = load_config("laion-1.5B-upsampler")
    base, upsampler = upsampled.decoder.unet_sources
    assert base == decoder and upsampler.unet_numbers == [2]
    assert upsampler.load_model_from.path.endswith("Veldrovive/upsamplers/resolve/main/working/latest.pth")
    assert upsampled.strict_loading  # unlike dalle2-laion's presets


def test_laion_architectures_on_the_meta_device():
    with torch.device("meta"):
        decoder = Decoder(
            unet=Unet(**LAION_UNET),
            image_sizes=[64],
            timesteps=1000,
            loss_type="l2",
            beta_schedule=["cosine"],
            learned_variance=True,
        )
        prior = DiffusionPrior(
            net=DiffusionPriorNetwork(**LAION_PRIOR_NET),
            image_embed_dim=768,
            timesteps=1000,
            cond_drop_prob=0.1,
            loss_type="l2",
            condition_on_text_encodings=True,
        )
    decoder_params = sum(p.numel() for p in decoder.parameters())
    prior_params = sum(p.numel() for p in prior.parameters())
    # What these hyperparameters build with dalle2-pytorch 1.15.6 (the "1.5B" of the decoder's
    # name is not what they give); fp32 weights: about 3.8 GB and 1.0 GB.
    assert 0.95e9 < decoder_params < 0.96e9
    assert 0.24e9 < prior_params < 0.26e9
    # What loading them takes (one copy, see scripts/bench_load.py): fp32 and half precision.
    gib = 2**30
    assert 3.5 < decoder_params * 4 / gib < 3.6 and 1.75 < decoder_params * 2 / gib < 1.8
    assert 0.9 < prior_params * 4 / gib < 1.0
    assert decoder.unets[0].cond_on_text_encodings and decoder.image_sizes == (64,)
    assert prior.net.dim == 768 and prior.image_embed_dim == 768
