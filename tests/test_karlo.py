"""Kakao Brain's Karlo, in diffusers' unCLIP layout: loading (folder, hub repository, presets),
exact parity of our loop with diffusers' `UnCLIPPipeline` and `UnCLIPImageVariationPipeline`, the
CLIP towers from transformers' layout, and every command on Karlo.

The pipelines are tiny and random (tests/tiny_karlo.py), written by diffusers' and transformers'
own `save_pretrained`. The reference pipelines are assembled from the same network objects our
manager loaded (the networks are diffusers' own classes: what is compared is everything around
them, i.e. the loop, guidance, schedule, text projection and noise), and read text through our
CLIP towers, whose equality with transformers' is tested on its own.
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from dalle2_cli.config import load_config
from dalle2_cli.errors import InputError
from dalle2_cli.loading.clip import tokenize
from dalle2_cli.loading.manager import DalleModelManager
from dalle2_cli.sampling.loops import PriorConditions, UnetConditions, sample_prior, sample_unet
from dalle2_cli.sampling.manipulate import Interpolation, TextDiff
from dalle2_cli.sampling.noise import GeneratorNoise
from dalle2_cli.sampling.pipelines import ImageVariation, Inpainting
from dalle2_cli.sampling.schedulers import DECODER, PRIOR, make_scheduler
from tests.helpers import error_lines, invoke, run_cli
from tests.tiny_karlo import TEXT_TO_IMAGE, VARIATIONS, reference_pipeline, write_tiny_karlo

pytest.importorskip("diffusers")
pytest.importorskip("transformers")
logging.getLogger("diffusers").setLevel(logging.ERROR)

PROMPTS = ["a red circle", "a blue square on green"]


@pytest.fixture(scope="module")
def karlo(tmp_path_factory) -> SimpleNamespace:
    folder = tmp_path_factory.mktemp("karlo") / "karlo-tiny"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        parts = write_tiny_karlo(folder, TEXT_TO_IMAGE, seed=1)
    return SimpleNamespace(folder=folder, parts=parts)


@pytest.fixture(scope="module")
def karlo_variations(tmp_path_factory) -> SimpleNamespace:
    folder = tmp_path_factory.mktemp("karlo") / "karlo-variations-tiny"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        parts = write_tiny_karlo(folder, VARIATIONS, seed=2, safetensors=False)  # .bin, as on the hub
    return SimpleNamespace(folder=folder, parts=parts)


class OurTextTower(torch.nn.Module):
    """Our CLIP text tower, answering as transformers' CLIPTextModelWithProjection does."""

    def __init__(self, adapter):
        super().__init__()
        self.adapter, self.dtype, self.device = adapter, torch.float32, torch.device("cpu")

    def forward(self, ids):
        embed, encodings = self.adapter.embed_text(ids)
        return SimpleNamespace(text_embeds=embed, last_hidden_state=encodings)


def reference_on(manager: DalleModelManager, parts: dict):
    decoder = manager.decoder
    shared = {
        "text_encoder": OurTextTower(manager.clip),
        "decoder": decoder.decoder,
        "super_res_first": decoder.super_res_first,
        "super_res_last": decoder.super_res_last,
    }
    if "prior" in parts:
        shared["prior"] = manager.prior.net
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = reference_pipeline({**parts, **shared})
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generators(per_image: bool, count: int):
    return (
        [torch.Generator().manual_seed(10 + i) for i in range(count)] if per_image else torch.Generator().manual_seed(5)
    )


def _text(manager: DalleModelManager, texts: list[str], repeat: int):
    embed, encodings = manager.clip.embed_text(tokenize(manager.clip, texts))
    return embed.repeat_interleave(repeat, 0), encodings.repeat_interleave(repeat, 0)


def our_images(manager, noise, image_embeds, text, null, decoder_scale, steps=(25, 7)) -> np.ndarray:
    """The decoder and super-resolution stages, as InferenceScript runs them."""
    decoder = manager.decoder
    conditions = UnetConditions(image_embeds, text[1], text[0], null)
    small = sample_unet(
        decoder,
        0,
        conditions,
        make_scheduler("ddpm", decoder.noise_schedulers[0], steps[0], DECODER),
        noise,
        decoder_scale,
    )
    big_scheduler = make_scheduler("ddpm", decoder.noise_schedulers[1], steps[1], DECODER)
    big = sample_unet(decoder, 1, conditions, big_scheduler, noise, 1.0, lowres_image=small)
    return big.permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize(
    ("prompts", "per_prompt", "per_image", "prior_scale", "decoder_scale"),
    [
        (PROMPTS[:1], 1, False, 4.0, 8.0),
        (PROMPTS, 2, False, 4.0, 8.0),
        (PROMPTS, 2, True, 4.0, 8.0),
        (PROMPTS[:1], 1, True, 1.0, 1.0),
        (PROMPTS, 1, False, 1.0, 1.0),
    ],
)
@torch.no_grad()
def test_text_to_image_equals_diffusers_unclip_pipeline(
    karlo, prompts, per_prompt, per_image, prior_scale, decoder_scale
):
    manager = DalleModelManager(load_config(str(karlo.folder)), log=lambda _: None)
    pipe = reference_on(manager, karlo.parts)
    count = len(prompts) * per_prompt
    theirs = pipe(
        prompts,
        num_images_per_prompt=per_prompt,
        generator=generators(per_image, count),
        prior_guidance_scale=prior_scale,
        decoder_guidance_scale=decoder_scale,
        output_type="np",
    ).images

    noise = GeneratorNoise(generators(per_image, count))
    text = _text(manager, prompts, per_prompt)
    null = PriorConditions(*_text(manager, [""] * len(prompts), per_prompt))  # encoded as diffusers batches it
    prior = manager.prior
    embeds = sample_prior(
        prior,
        PriorConditions(*text, negative=null),
        make_scheduler("ddpm", prior.noise_scheduler, 25, PRIOR),
        noise,
        prior_scale,
    )
    ours = our_images(manager, noise, embeds, text, null, decoder_scale)
    assert ours.shape == theirs.shape == (count, 64, 64, 3)
    assert np.abs(ours - theirs).max() == 0
    assert theirs.std() > 0.1  # images, not a constant


@pytest.mark.parametrize(("images", "per_image", "decoder_scale"), [(1, False, 8.0), (2, True, 8.0), (2, False, 1.0)])
@torch.no_grad()
def test_variations_equal_diffusers_image_variation_pipeline(karlo_variations, images, per_image, decoder_scale):
    manager = DalleModelManager(load_config(str(karlo_variations.folder)), log=lambda _: None)
    pipe = reference_on(manager, karlo_variations.parts)
    pictures = torch.rand(images, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    image_embeds, _ = manager.clip.embed_image(pictures)
    theirs = pipe(
        image_embeddings=image_embeds,
        generator=generators(per_image, images),
        decoder_guidance_scale=decoder_scale,
        output_type="np",
    ).images
    text = _text(manager, [""] * images, 1)
    null = PriorConditions(*text)
    ours = our_images(manager, GeneratorNoise(generators(per_image, images)), image_embeds, text, null, decoder_scale)
    assert np.abs(ours - theirs).max() == 0


@torch.no_grad()
def test_clip_towers_from_transformers_layout_equal_transformers(karlo_variations):
    """Our open_clip build of transformers' CLIP: the text tower equal bit for bit on one prompt
    (batches of several differ in the last float bits, as kernels block them differently)."""
    from torchvision.transforms import Normalize

    from dalle2_cli.loading.clip import OPENAI_MEAN, OPENAI_STD

    manager = DalleModelManager(load_config(str(karlo_variations.folder)), log=lambda _: None)
    clip, parts = manager.clip, karlo_variations.parts
    tokens = tokenize(clip, PROMPTS)
    embed, encodings = clip.embed_text(tokens[:1])
    reference = parts["text_encoder"](tokens[:1])
    assert torch.equal(embed, reference.text_embeds)
    real = int((tokens[0] != 0).sum())  # start, words, end
    assert torch.equal(encodings[0, :real], reference.last_hidden_state[0, :real])
    assert encodings[0, real:].abs().max() == 0  # after the end token: masked, as zero rows
    both, _ = clip.embed_text(tokens)
    assert torch.allclose(both, parts["text_encoder"](tokens).text_embeds, atol=1e-5)
    pictures = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    image_embeds, _ = clip.embed_image(pictures)
    expected = parts["image_encoder"](Normalize(OPENAI_MEAN, OPENAI_STD)(pictures)).image_embeds
    assert torch.allclose(image_embeds, expected, atol=1e-5)


def test_an_exclamation_mark_is_read_as_clip_s_bpe_reads_it(karlo):
    """Our choice (see the manual): CLIP's own BPE, as Karlo was trained with. diffusers' Karlo
    tokenizer has "!" as its pad token, so every "!" of a prompt becomes token 0, the padding."""
    manager = DalleModelManager(load_config(str(karlo.folder)), log=lambda _: None)
    ours = tokenize(manager.clip, ["wow!"])[0]
    theirs = karlo.parts["tokenizer"](["wow!"], padding="max_length", max_length=77).input_ids[0]
    assert 0 not in ours[: int((ours != 0).sum())].tolist()
    assert theirs[2] == 0 and ours[2] != 0  # start, "wow", then "!": 0 in diffusers', its BPE token in ours


def test_schedule_and_last_step_follow_diffusers():
    """The cosine betas, the respaced step times and the last step's coefficient are diffusers'
    (the last step multiplies the clean prediction by betas[0] / (1 - alphas_cumprod[0]) in
    float32, 0.9995 rather than Karlo's original 1: see the manual)."""
    from diffusers import UnCLIPScheduler

    from dalle2_cli.karlo.schedule import KarloSchedule
    from dalle2_cli.sampling.schedulers import Prediction

    theirs = UnCLIPScheduler(variance_type="fixed_small_log", prediction_type="sample", clip_sample_range=5.0)
    schedule = KarloSchedule(dict(theirs.config))
    assert torch.equal(schedule.betas, theirs.betas) and torch.equal(schedule.alphas_cumprod, theirs.alphas_cumprod)
    for steps in (7, 25, 1000):
        theirs.set_timesteps(steps)
        assert make_scheduler("ddpm", schedule, steps, PRIOR).timesteps == theirs.timesteps.tolist()
    last = make_scheduler("ddpm", schedule, 7, PRIOR)
    x0 = torch.ones(1, 4)
    out = last.step(Prediction(x0), 0, torch.zeros(1, 4), GeneratorNoise(torch.Generator()))
    assert out[0, 0] == theirs.step(x0, 0, torch.zeros(1, 4)).prev_sample[0, 0]
    assert 0.999 < float(out[0, 0]) < 1.0


# -- as users run it ---------------------------------------------------------------------


def _pngs(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.png"))


def _record(path: Path) -> dict:
    return json.loads(Image.open(path).info["dalle2-cli"])


def test_text_to_image_and_inpainting_from_a_karlo_folder(karlo, tmp_path):
    out = tmp_path / "t2i"
    done = invoke("text2im", "-c", karlo.folder, "a red circle", "-n", "2", "--seed", "3", "-o", out, check=True)
    made = _pngs(out)
    assert len(made) == 2 and Image.open(made[0]).size == (64, 64)
    record = _record(made[0])
    assert record["prior_steps"] == 25 and record["decoder_steps"] == [25, 7]
    assert record["prior_cond_scale"] == 4.0 and record["decoder_cond_scale"] == [8.0, 1.0]
    assert {"prior", "decoder", "super_res_last", "text_encoder", "model index"} <= set(record["model_sha256"])
    again = tmp_path / "again"
    invoke("text2im", "-c", karlo.folder, "a red circle", "-n", "2", "--seed", "3", "-o", again, check=True)
    assert np.array_equal(np.asarray(Image.open(made[1])), np.asarray(Image.open(_pngs(again)[1])))
    assert "loaded prior" in done.stderr

    # RePaint at 16 and 64 px: what the mask keeps stays exactly.
    mask = np.zeros((64, 64), np.uint8)
    mask[16:48, 16:48] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    painted = tmp_path / "painted"
    invoke(
        "inpaint",
        "-c",
        karlo.folder,
        made[0],
        tmp_path / "mask.png",
        "a blue square",
        "--seed",
        "1",
        "-o",
        painted,
        check=True,
    )
    before, after = np.asarray(Image.open(made[0])), np.asarray(Image.open(_pngs(painted)[0]))
    assert np.array_equal(before[:16], after[:16]) and not np.array_equal(before[16:48, 16:48], after[16:48, 16:48])


def test_samplers_negative_prompt_and_super_res_steps(karlo, tmp_path):
    for sampler in ("ddim", "dpm++2m"):
        out = tmp_path / sampler
        invoke(
            "text2im", "-c", karlo.folder, "a red circle", "--sampler", sampler, "--prior-steps", "8",
            "--decoder-steps", "8", "--negative-prompt", "blue", "-o", out, check=True,
        )  # fmt: skip
        record = _record(_pngs(out)[0])
        # The super-resolution keeps DDPM and its 7 steps (super_res_last is for the last of 7).
        assert record["decoder_sampler"] == [sampler, "ddpm"] and record["decoder_steps"] == [8, 7]
        assert record["prior_sampler"] == sampler and record["negative_prompt"] == "blue"
    changed = invoke("text2im", "-c", karlo.folder, "a red circle", "--decoder-steps", "5,3", "-o", tmp_path / "x")
    assert changed.returncode == 0 and "last of 7 steps" in changed.stderr
    refused = invoke("text2im", "-c", karlo.folder, "a red circle", "--decoder-cond-scale", "8,2", "-o", tmp_path / "y")
    assert refused.returncode == 2 and "nothing to guide by" in error_lines(refused.stderr)[0]


def test_variations_interpolation_and_text_diff_from_a_bin_folder(karlo_variations, tmp_path):
    picture = tmp_path / "in.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 30, 3), np.uint8)).save(picture)
    other = tmp_path / "other.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (30, 30, 3), np.uint8)).save(other)
    folder = karlo_variations.folder
    invoke("variation", "-c", folder, picture, "-n", "2", "-o", tmp_path / "v", check=True)
    assert len(_pngs(tmp_path / "v")) == 2
    invoke("interpolate", "-c", folder, picture, other, "--frames", "3", "-o", tmp_path / "i", check=True)
    assert len(_pngs(tmp_path / "i")) == 3
    invoke(
        "textdiff",
        "-c",
        folder,
        picture,
        "--from",
        "a cat",
        "--to",
        "a dog",
        "--frames",
        "2",
        "-o",
        tmp_path / "d",
        check=True,
    )
    assert len(_pngs(tmp_path / "d")) == 2
    invoke("inpaint", "-c", folder, picture, picture, "--seed", "1", "-o", tmp_path / "p", check=True)
    refused = invoke("text2im", "-c", folder, "a red circle", "-o", tmp_path / "t")
    assert refused.returncode == 2 and "no prior" in error_lines(refused.stderr)[0]


def test_rerank_borrows_the_image_tower_of_another_pipeline(karlo, karlo_variations, tmp_path):
    without = invoke("text2im", "-c", karlo.folder, "a red circle", "--rerank", "2", "-o", tmp_path / "n")
    assert without.returncode == 2 and "no CLIP image tower" in error_lines(without.stderr)[0]
    assert "loaded" not in without.stderr  # refused before reading gigabytes of weights
    picture = tmp_path / "in.png"
    Image.new("RGB", (64, 64), (200, 30, 30)).save(picture)
    manager = DalleModelManager(load_config(karlo.folder))
    needs_the_tower = [
        lambda: ImageVariation(manager).run([Image.open(picture)]),
        lambda: Inpainting(manager).run(Image.open(picture), np.ones((64, 64), bool)),
        lambda: Interpolation(manager).run(Image.open(picture), Image.open(picture)),
        lambda: TextDiff(manager).run(Image.open(picture), "red", "blue"),
    ]
    for run in needs_the_tower:
        with pytest.raises(InputError, match="no CLIP image tower"):
            run()
    assert manager.files == {"model index": karlo.folder / "model_index.json"}  # nothing else read
    config = tmp_path / "karlo-rerank.json"
    config.write_text(json.dumps({"unclip": {
        "load_type": "local", "path": str(karlo.folder),
        "image_encoder_from": {"load_type": "local", "path": str(karlo_variations.folder)},
    }}))  # fmt: skip
    invoke("text2im", "-c", config, "a red circle", "--rerank", "2", "--seed", "4", "-o", tmp_path / "r", check=True)
    rerank = _record(_pngs(tmp_path / "r")[0])["rerank"]
    assert rerank["candidates"] == 2 and len(rerank["scores"]) == 2


@pytest.mark.parametrize("simulated", [False, True], ids=["this-cpu", "a-cpu-without-half-arithmetic"])
def test_half_precision_and_low_memory(karlo, tmp_path, monkeypatch, simulated):
    """bf16 and fp16 weights, converted at first use or per stage (--low-memory). A CPU without
    that arithmetic keeps the weights in half precision and computes in float32: diffusers'
    networks then take float32 inputs too (they cast their inputs to their own `dtype`)."""
    from dalle2_cli.loading import manager

    if simulated:
        monkeypatch.setattr(manager, "cpu_computes_in", lambda dtype: dtype == torch.float32)
    for dtype, name in ((torch.bfloat16, "bf16"), (torch.float16, "fp16")):
        for low_memory in ((), ("--low-memory",)):
            out = tmp_path / f"{name}{''.join(low_memory)}"
            options = ("--prior-steps", "4", "--decoder-steps", "4,2", "--dtype", name, *low_memory, "-o", out)
            made = invoke("text2im", "-c", karlo.folder, "a red circle", *options)
            assert made.returncode == 0, made.stderr
            assert ("computed in fp32" in made.stderr) is not manager.cpu_computes_in(dtype)
            assert _record(_pngs(out)[0])["dtype"] == str(dtype).removeprefix("torch.")


def test_inspect_names_karlo_s_files(karlo, karlo_variations):
    folder = invoke("inspect", karlo_variations.folder, check=True).stdout
    assert "UnCLIPImageVariationPipeline" in folder
    for component, name in [
        ("image_encoder", "CLIP image tower (transformers layout)"),
        ("decoder", "Karlo decoder (diffusers UNet2DConditionModel)"),
        ("super_res_last", "Karlo super-resolution (diffusers UNet2DModel)"),
        ("text_proj", "Karlo text projection (UnCLIPTextProjModel)"),
    ]:
        assert any(line.split()[0] == component and name in line for line in folder.splitlines())
    prior = invoke("inspect", karlo.folder / "prior" / "diffusion_pytorch_model.safetensors", check=True).stdout
    assert "Karlo prior (diffusers PriorTransformer)" in prior
    assert invoke("inspect", karlo.folder / "prior", check=True).stdout == prior  # the component's folder
    image_tower = invoke("inspect", karlo_variations.folder / "image_encoder", check=True).stdout
    assert "pytorch_model.bin" in image_tower and "CLIP image tower (transformers layout)" in image_tower
    refused = invoke("inspect", karlo.folder / "prior_scheduler")
    assert refused.returncode == 2 and "no model_index.json and no weights file" in error_lines(refused.stderr)[0]


def test_presets_and_a_folder_without_an_index(tmp_path):
    listed = invoke("config", "list", check=True).stdout
    assert "karlo\t" in listed and "karlo-variations\t" in listed
    preset = load_config("kakaobrain/karlo-v1-alpha")  # a repository id finds its preset
    assert preset.unclip.path.startswith("hf://kakaobrain/karlo-v1-alpha") and preset.unclip.weights == "safetensors"
    assert load_config("karlo-variations").unclip.weights == "bin"
    (tmp_path / "empty").mkdir()
    refused = invoke("text2im", "-c", tmp_path / "empty", "x")
    assert refused.returncode == 2 and "model_index.json" in error_lines(refused.stderr)[0]


def test_a_hub_repository_id_fetches_through_the_cache_and_runs_offline(karlo_variations, tmp_path):
    """`-c ORG/REPO`: every file through huggingface_hub (its cache), the pickled .bin weights
    taken where the repository has no safetensors; then the same run offline."""
    from tests.http_server import FakeServer
    from tests.test_hub import env_for

    server = FakeServer()
    try:
        for path in karlo_variations.folder.rglob("*"):
            if path.is_file():
                relative = path.relative_to(karlo_variations.folder).as_posix()
                server.serve(
                    f"/org/karlo-tiny/resolve/main/{relative}", path.read_bytes(), hub=True, lfs=path.suffix != ".json"
                )
        picture = tmp_path / "in.png"
        Image.new("RGB", (32, 32), "red").save(picture)
        env = env_for(server, tmp_path)
        fetched = run_cli("models", "download", "-c", "org/karlo-tiny", env=env)
        assert fetched.returncode == 0, fetched.stderr
        assert server.gets("/org/karlo-tiny/resolve/main/decoder/diffusion_pytorch_model.bin")
        online = run_cli("variation", "-c", "org/karlo-tiny", picture, "--seed", "1", "-o", tmp_path / "a", env=env)
        assert online.returncode == 0, online.stderr
        offline = run_cli(
            "variation",
            "-c",
            "org/karlo-tiny",
            picture,
            "--seed",
            "1",
            "-o",
            tmp_path / "b",
            env={**env, "HF_HUB_OFFLINE": "1"},
        )
        assert offline.returncode == 0, offline.stderr
        first, second = (np.asarray(Image.open(_pngs(tmp_path / d)[0])) for d in "ab")
        assert np.array_equal(first, second)
        verified = run_cli("models", "verify", "-c", "org/karlo-tiny", env={**env, "HF_HUB_OFFLINE": "1"})
        assert verified.returncode == 0 and "decoder/diffusion_pytorch_model.bin" in verified.stdout
    finally:
        server.close()


def test_a_laion_config_takes_vit_from_transformers_layout_as_from_openai_s(tmp_path):
    """make "transformers" (config.json + weights, as openai/clip-vit-large-patch14 is on the
    hub) gives the same CLIP as the OpenAI state dict route, and transformers itself reads the file."""
    import open_clip
    from safetensors.torch import save_file
    from transformers import CLIPConfig, CLIPModel

    from dalle2_cli.config import ClipConfig
    from dalle2_cli.loading.clip import build_clip

    torch.manual_seed(0)
    width = 64  # OpenAI's layout implies 64-wide heads
    model = open_clip.CLIP(
        embed_dim=32,
        vision_cfg={"layers": 2, "width": width, "head_width": 64, "patch_size": 8, "image_size": 32},
        text_cfg={"context_length": 77, "vocab_size": 49408, "width": width, "heads": 1, "layers": 2},
        quick_gelu=True,
    )
    openai_state = {k: v.clone() for k, v in model.state_dict().items()}
    torch.save(openai_state, tmp_path / "openai.pt")
    hf = {}  # the same weights under transformers' names (written here from its documented layout)
    for ours, prefix in (("transformer", "text_model"), ("visual.transformer", "vision_model")):
        for n in range(2):
            a, b = f"{ours}.resblocks.{n}.", f"{prefix}.encoder.layers.{n}."
            for kind in ("weight", "bias"):
                q, k, v = openai_state[f"{a}attn.in_proj_{kind}"].chunk(3)
                hf.update(
                    {
                        f"{b}self_attn.q_proj.{kind}": q,
                        f"{b}self_attn.k_proj.{kind}": k,
                        f"{b}self_attn.v_proj.{kind}": v,
                    }
                )
                for theirs_name, our_name in (
                    ("self_attn.out_proj", "attn.out_proj"),
                    ("layer_norm1", "ln_1"),
                    ("layer_norm2", "ln_2"),
                    ("mlp.fc1", "mlp.c_fc"),
                    ("mlp.fc2", "mlp.c_proj"),
                ):
                    hf[f"{b}{theirs_name}.{kind}"] = openai_state[f"{a}{our_name}.{kind}"]
    hf["text_model.embeddings.token_embedding.weight"] = openai_state["token_embedding.weight"]
    hf["text_model.embeddings.position_embedding.weight"] = openai_state["positional_embedding"]
    for kind in ("weight", "bias"):
        hf[f"text_model.final_layer_norm.{kind}"] = openai_state[f"ln_final.{kind}"]
        hf[f"vision_model.pre_layrnorm.{kind}"] = openai_state[f"visual.ln_pre.{kind}"]
        hf[f"vision_model.post_layernorm.{kind}"] = openai_state[f"visual.ln_post.{kind}"]
    hf["text_projection.weight"] = openai_state["text_projection"].t().contiguous()
    hf["visual_projection.weight"] = openai_state["visual.proj"].t().contiguous()
    hf["vision_model.embeddings.class_embedding"] = openai_state["visual.class_embedding"]
    hf["vision_model.embeddings.patch_embedding.weight"] = openai_state["visual.conv1.weight"]
    hf["vision_model.embeddings.position_embedding.weight"] = openai_state["visual.positional_embedding"]
    hf["logit_scale"] = openai_state["logit_scale"]
    save_file({k: v.contiguous() for k, v in hf.items()}, tmp_path / "model.safetensors")
    config = CLIPConfig(
        projection_dim=32,
        text_config={
            "hidden_size": width,
            "intermediate_size": 4 * width,
            "num_attention_heads": 1,
            "num_hidden_layers": 2,
        },
        vision_config={
            "hidden_size": width,
            "intermediate_size": 4 * width,
            "num_attention_heads": 1,
            "num_hidden_layers": 2,
            "image_size": 32,
            "patch_size": 8,
        },
    )
    (tmp_path / "config.json").write_text(config.to_json_string())

    def local(name: str) -> dict:
        return {"load_type": "local", "path": str(tmp_path / name)}

    resolve = lambda file: Path(file.path)  # noqa: E731
    by_openai = build_clip(ClipConfig(make="openai", load_model_from=local("openai.pt")), resolve)
    by_transformers = build_clip(
        ClipConfig(
            make="transformers", load_model_from=local("model.safetensors"), load_config_from=local("config.json")
        ),
        resolve,
    )
    tokens = tokenize(by_openai, PROMPTS)
    pictures = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for method, given in (("embed_text", tokens), ("embed_image", pictures)):
            a, b = getattr(by_openai, method)(given), getattr(by_transformers, method)(given)
            assert torch.allclose(a[0], b[0], atol=1e-6)  # equal but for how each file's memory is laid out
        reference = CLIPModel.from_pretrained(str(tmp_path)).eval()
        normalized = by_transformers.clip_normalize(pictures)
        expected = reference(input_ids=tokens, pixel_values=normalized)  # unit embeddings, as the adapter's
        assert torch.allclose(by_transformers.embed_text(tokens)[0], expected.text_embeds, atol=1e-5)
        assert torch.allclose(by_transformers.embed_image(pictures)[0], expected.image_embeds, atol=1e-5)


def test_served_through_openai_s_sdk_as_a_lone_run_makes_it(karlo, tmp_path):
    import base64
    import io

    import openai

    from dalle2_cli.sampling.pipelines import TextToImage
    from dalle2_cli.sampling.settings import SamplingSettings
    from tests.serving import running

    with running(karlo.folder, tmp_path) as server:
        response = server.client().images.generate(
            prompt="a red circle", n=2, response_format="b64_json", extra_body={"seed": 5, "prior_steps": 6}
        )
        images = [Image.open(io.BytesIO(base64.b64decode(entry.b64_json))) for entry in response.data]
        picture = io.BytesIO()
        Image.new("RGB", (64, 64), (200, 30, 30)).save(picture, format="PNG")
        with pytest.raises(openai.BadRequestError, match="no CLIP image tower"):
            server.client().images.create_variation(image=("in.png", picture.getvalue(), "image/png"))
        lone = TextToImage(server.service.manager, SamplingSettings(seed=5, prior_steps=6)).run(["a red circle"], 2)
    assert [image.size for image in images] == [(64, 64)] * 2
    for image, expected in zip(images, lone, strict=True):
        difference = np.abs(np.asarray(image.convert("RGB"), np.int16) - np.asarray(expected.image, np.int16))
        assert difference.max() <= 1


def test_accelerate_launch_and_resume_make_the_files_of_one_process(karlo, tmp_path):
    from tests.test_scaleout import ENV, assert_same_images, launch, pngs

    options = ("a red circle", "-c", str(karlo.folder), "-n", "3", "--seed", "3", "--batch-size", "1")
    options += ("--prior-steps", "2", "--decoder-steps", "2", "--device", "cpu")
    run_cli("text2im", *options, "-o", "one", "-q", cwd=tmp_path, check=True, env=ENV)
    one = pngs(tmp_path / "one")
    assert len(one) == 3
    launch(*options, "-o", "two", cwd=tmp_path)
    assert_same_images(tmp_path / "two", one)  # model files, settings and pixels
    made = {path.name: path.stat().st_ino for path in (tmp_path / "two").glob("*.png")}
    run_cli("text2im", *options, "-o", "two", "--resume", cwd=tmp_path, check=True, env=ENV)
    assert {path.name: path.stat().st_ino for path in (tmp_path / "two").glob("*.png")} == made  # none made again
