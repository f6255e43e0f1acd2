"""SSBA, sample-specific backdoor attack (Li et al. ICCV 2021): a StegaStamp encoder hides a fixed
secret bit string in every image; the encoded images (an invisible, per-image residual) relabelled
to the target are the poison. Dirty-label all-to-one, 10%, target 0 (BackdoorBench's
config/attack/ssba/default.yaml).

The official code (yuezunli/ISSBA, TensorFlow 1) ships no encoder training: its encode_image.py
loads a StegaStamp saved model (tancik/StegaStamp, credited in its header), feeds a 100-bit
secret (the string 'a' padded to 7 bytes + BCH(137, 5) ECC + 4 zero bits) with the image in [0, 1],
and stores the deployment graph's clip(image + residual, 0, 1) as (x * 255).astype(uint8), a
truncation. BackdoorBench (attack/ssba.py) trains nothing either: it replaces each image by row
`index` of an npy (N, H, W, C uint8, every image of the split, train and test alike) that its
resource/ssba scripts make with a PyTorch fingerprint encoder (BCE + ramped L2, Adam 1e-4).
That training (resource/ssba/train.py, ArtificialGANFingerprints' networks) is runnable PyTorch;
ours follows StegaStamp's TF networks instead and was not run beside it (docs/conformance.md).

Ours is an artifact node (harness/backdoor/learned.py, no clean surrogate): at the dataset's
native resolution, StegaStamp's networks (models.py) scaled to the image, trained here on the
train split with a random secret per image (as StegaStamp trains) and StegaStamp's losses
(train.py, scripts/base.sh: secret sigmoid cross-entropy x1.5, image L2 in YUV with scales
1/100/100 x2 (grey: the one channel), no image loss for the first 1500 of 140000 steps, then L2
ramped over 15000: the same fractions of our step budget), Adam (lr 1e-3: StegaStamp's 1e-4 stayed
at chance bit accuracy over 2400 of our 4000 steps on digits, measured); until the train batches'
running bit accuracy reaches `bit_threshold` once the L2 ramp is complete, or `steps`. The
artifact stores the encoder's weights (float32 state-dict arrays, never a pickle), the fixed
secret it encodes and the training facts; the decoder's weights too (tests read its bit
accuracy). At poison time the encoder runs on the batch in float64 (so an image's bytes do not
depend on the batch it is in), and the poisoned image is floor(clip(x + residual, 0, 1) * 255) /
255: ISSBA's stored bytes. Every test image is encoded by the same encoder. Why weights and not
stored images: docs/backdoor.md (SSBA).

Departures, named: no LPIPS (its weights are a download) and no critic (WGAN discriminator) and
none of StegaStamp's physical-world perturbations (perspective warp with its STN in the decoder,
blur, noise, colour, JPEG), which print-and-photograph robustness needs and a digital poison does
not; instead the decoder sees the encoded image truncated to uint8 (straight-through), the bytes
the classifier trains on. The secret is `secret_bits` seeded bits from `pattern_seed` (ISSBA's
BCH-coded string needs bchlib). The U-Net has as many stride-2 levels as the image allows (4 as
StegaStamp's down to 2 x 2 pixels; 8x8 digits get 2), channel widths `width` x (1, 1, 2, 4, 8)
(StegaStamp's 32), the secret's dense map at 1/8 of the image (StegaStamp's 50 x 50 of 400),
at least 4 x 4, nearest-upsampled; StegaStamp's unused conv10 (its residual reads conv9) is left out.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from harness.backdoor.base import from_levels
from harness.backdoor.learned import LearnedPoison
from harness.core.registry import POISONS

YUV = torch.tensor([[0.299, 0.587, 0.114], [-0.14714119, -0.28886916, 0.43601035],
                    [0.61497538, -0.51496512, -0.10001026]])  # tf.image.rgb_to_yuv's kernel (rows: Y, U, V)


def unet_depth(height: int, width: int) -> int:
    """Stride-2 levels of the encoder: StegaStamp's 4, fewer while the coarsest map would drop
    below 2 x 2 or the size is not divisible."""
    depth = 0
    while depth < 4 and height % 2 ** (depth + 1) == 0 and width % 2 ** (depth + 1) == 0 \
            and min(height, width) // 2 ** (depth + 1) >= 2:
        depth += 1
    return depth


def conv(cin: int, cout: int, k: int = 3, stride: int = 1) -> nn.Conv2d:
    """A Keras Conv2D(padding='same', he_normal) for odd k."""
    layer = nn.Conv2d(cin, cout, k, stride, k // 2)
    nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
    nn.init.zeros_(layer.bias)
    return layer


class Encoder(nn.Module):
    """StegaStamp's encoder: (secret in {0,1}^bits, image in [0,1]) -> residual (same shape as the image)."""

    def __init__(self, channels: int, height: int, width: int, bits: int, base: int = 32) -> None:
        super().__init__()
        self.shape = (channels, height, width)
        self.grid = (max(min(4, height), height // 8), max(min(4, width), width // 8))
        self.secret_dense = nn.Linear(bits, channels * self.grid[0] * self.grid[1])
        nn.init.kaiming_normal_(self.secret_dense.weight, nonlinearity="relu")
        nn.init.zeros_(self.secret_dense.bias)
        self.depth = unet_depth(height, width)
        widths = [base, base, 2 * base, 4 * base, 8 * base][: self.depth + 1]
        self.down = nn.ModuleList([conv(2 * channels, widths[0])] +
                                  [conv(widths[i], widths[i + 1], stride=2) for i in range(self.depth)])
        self.up = nn.ModuleList()  # Conv2D(k=2, 'same') after UpSampling2D(2): TF pads one row/column after
        self.merge = nn.ModuleList()
        for i in reversed(range(self.depth)):
            out = widths[i] if i > 0 else base
            up = nn.Conv2d(widths[i + 1], out, 2)
            nn.init.kaiming_normal_(up.weight, nonlinearity="relu")
            nn.init.zeros_(up.bias)
            self.up.append(up)
            extra = 2 * channels if i == 0 else 0  # merge9 also concatenates the inputs
            self.merge.append(conv(widths[i] + out + extra, widths[i] if i > 0 else base))
        if self.depth == 0:
            self.merge.append(conv(base + 2 * channels, base))
        self.residual = nn.Conv2d(base, channels, 1)
        nn.init.kaiming_normal_(self.residual.weight)
        nn.init.zeros_(self.residual.bias)

    def forward(self, secret: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        c, h, w = self.shape
        s = F.relu(self.secret_dense(secret - 0.5)).view(-1, c, *self.grid)
        s = F.interpolate(s, size=(h, w), mode="nearest").expand(len(image), -1, -1, -1)
        inputs = torch.cat([s, image - 0.5], 1)
        skips = []
        x = inputs
        for layer in self.down:
            x = F.relu(layer(x))
            skips.append(x)
        x = skips.pop()
        for j, (up, merge) in enumerate(zip(self.up, self.merge)):
            x = F.relu(up(F.pad(F.interpolate(x, scale_factor=2.0, mode="nearest"), (0, 1, 0, 1))))
            parts = [skips.pop(), x] + ([inputs] if not skips else [])
            x = F.relu(merge(torch.cat(parts, 1)))
        if self.depth == 0:
            x = F.relu(self.merge[0](torch.cat([x, inputs], 1)))
        return self.residual(x)


class Decoder(nn.Module):
    """StegaStamp's decoder without its spatial transformer: image -> secret logits."""

    def __init__(self, channels: int, height: int, width: int, bits: int, base: int = 32) -> None:
        super().__init__()
        plan = [(base, 2), (base, 1), (2 * base, 2), (2 * base, 1), (2 * base, 2), (4 * base, 2), (4 * base, 2)]
        layers: list[nn.Module] = []
        cin = channels
        for cout, stride in plan:
            layers += [conv(cin, cout, stride=stride), nn.ReLU()]
            cin = cout
        self.features = nn.Sequential(*layers)
        with torch.no_grad():
            flat = self.features(torch.zeros(1, channels, height, width)).numel()
        self.dense = nn.Sequential(nn.Flatten(), nn.Linear(flat, 512), nn.ReLU(), nn.Linear(512, bits))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.dense(self.features(image - 0.5))


def make_secret(bits: int, seed: int) -> torch.Tensor:
    """The fixed secret: `bits` bits from a numpy generator seeded by `seed` (float32 0/1)."""
    rng = np.random.default_rng(np.random.SeedSequence([int(seed) & 0xFFFF_FFFF, 0x55BA]))
    return torch.from_numpy(rng.integers(0, 2, size=int(bits)).astype(np.float32))


def encode(encoder: Encoder, secret: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    """ISSBA's deployment graph: clip(image + residual, 0, 1); `secret` one (bits,) for every image
    or one row per image (B, bits)."""
    return (image + encoder(secret if secret.ndim == 2 else secret[None], image)).clamp(0.0, 1.0)


def image_loss(encoded: torch.Tensor, image: torch.Tensor, yuv_scales: tuple[float, float, float]) -> torch.Tensor:
    """StegaStamp's image loss: the per-channel mean squared difference in YUV, weighted by the
    YUV scales (a grey image: its one channel's mean squared difference)."""
    diff = encoded - image
    if diff.shape[1] != 3:
        return diff.square().mean()
    yuv = torch.einsum("kc,bchw->bkhw", YUV.to(diff), diff)
    return (yuv.square().mean(dim=(0, 2, 3)) * torch.tensor(yuv_scales).to(diff)).sum()


def truncated(encoded: torch.Tensor) -> torch.Tensor:
    """floor(x * 255) / 255 forward (the stored bytes), identity backward."""
    return encoded + (torch.floor(encoded.detach() * 255) / 255 - encoded.detach())


def bit_accuracy(logits: torch.Tensor, secret: torch.Tensor) -> float:
    """The share of bits the logits (B, bits) decode right against `secret` (bits,) or (B, bits)."""
    return float(((logits > 0).to(secret.dtype) == secret).float().mean())


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of two image batches in [0, 1] (over all pixels)."""
    mse = float((a.double() - b.double()).square().mean())
    return float("inf") if mse == 0 else 10 * math.log10(1.0 / mse)


@POISONS.register("ssba")
class SSBA(LearnedPoison):
    name = "ssba"
    needs_surrogate = False
    artifact_fields = ("pattern_seed", "secret_bits", "width", "steps", "batch_size", "lr", "bit_threshold",
                       "secret_loss_scale", "l2_loss_scale", "yuv_scales", "no_im_loss_steps", "l2_loss_ramp")

    def __init__(self, secret_bits: int = 100, width: int = 32, steps: int = 4000, batch_size: int = 64,
                 lr: float = 1e-3, bit_threshold: float = 0.99, secret_loss_scale: float = 1.5,
                 l2_loss_scale: float = 2.0, yuv_scales: tuple[float, float, float] | list[float] = (1.0, 100.0, 100.0),
                 no_im_loss_steps: int = 43, l2_loss_ramp: int = 429, **common) -> None:
        super().__init__(**common)
        if int(secret_bits) < 1 or int(width) < 1 or int(batch_size) < 1 or float(lr) <= 0:
            raise ValueError(f"ssba needs secret_bits >= 1, width >= 1, batch_size >= 1, lr > 0; got {secret_bits}, "
                             f"{width}, {batch_size}, {lr}. Fix: set backdoor.secret_bits / width / batch_size / lr")
        if int(steps) < int(no_im_loss_steps) + int(l2_loss_ramp) or int(no_im_loss_steps) < 0 or int(l2_loss_ramp) < 1:
            raise ValueError(f"ssba: backdoor.steps ({steps}) must cover the secret-only steps ({no_im_loss_steps}) and "
                             f"the L2 ramp ({l2_loss_ramp}, >= 1), or the image loss never reaches its weight. Fix: "
                             f"raise backdoor.steps or lower backdoor.no_im_loss_steps / backdoor.l2_loss_ramp")
        if not 0.5 <= float(bit_threshold) <= 1.0:
            raise ValueError(f"backdoor.bit_threshold must be in [0.5, 1] (a bit accuracy; 0.5 is chance), got "
                             f"{bit_threshold}")
        if len(tuple(yuv_scales)) != 3 or min(float(s) for s in yuv_scales) < 0:
            raise ValueError(f"backdoor.yuv_scales must be 3 weights >= 0 (Y, U, V), got {yuv_scales}")
        self.secret_bits, self.width, self.steps, self.batch_size = int(secret_bits), int(width), int(steps), int(batch_size)
        self.lr, self.bit_threshold = float(lr), float(bit_threshold)
        self.secret_loss_scale, self.l2_loss_scale = float(secret_loss_scale), float(l2_loss_scale)
        self.yuv_scales = [float(s) for s in yuv_scales]
        self.no_im_loss_steps, self.l2_loss_ramp = int(no_im_loss_steps), int(l2_loss_ramp)
        self._encoder: Encoder | None = None
        self._secret: torch.Tensor | None = None

    def networks(self, channels: int, height: int, width: int) -> tuple[Encoder, Decoder]:
        """The encoder and decoder for this image shape, initialised from `pattern_seed` (the global
        RNG is left as it was: the trainer's draws do not depend on loading a poison)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.pattern_seed)
            return (Encoder(channels, height, width, self.secret_bits, self.width),
                    Decoder(channels, height, width, self.secret_bits, self.width))

    def train_networks(self, images: torch.Tensor, device: torch.device | str = "cpu",
                       log: Callable[[str], None] = lambda m: None) -> tuple[Encoder, Decoder, dict[str, Any]]:
        """StegaStamp's joint training on `images` (N, C, H, W) in [0, 1], each image with a random
        secret (StegaStamp's and BackdoorBench's training: the fixed secret is only what is encoded
        later; trained on one secret, the decoder would learn it as a constant); returns the
        networks and the facts."""
        encoder, decoder = self.networks(*images.shape[1:])
        encoder.to(device).train()
        decoder.to(device).train()
        params = list(encoder.parameters()) + list(decoder.parameters())
        opt = torch.optim.Adam(params, lr=self.lr)
        gen = torch.Generator().manual_seed(self.pattern_seed)
        started, running, step = time.time(), 0.5, 0
        ramp_end = self.no_im_loss_steps + self.l2_loss_ramp
        for step in range(1, self.steps + 1):
            idx = torch.randint(len(images), (min(self.batch_size, len(images)),), generator=gen)
            x = images[idx].to(device)
            secrets = torch.randint(0, 2, (len(idx), self.secret_bits), generator=gen).float().to(device)
            encoded = encode(encoder, secrets, x)
            logits = decoder(truncated(encoded))
            loss = self.secret_loss_scale * F.binary_cross_entropy_with_logits(logits, secrets)
            if step > self.no_im_loss_steps:  # StegaStamp: no image loss at first, then L2 ramped in
                scale = self.l2_loss_scale * min(1.0, (step - self.no_im_loss_steps) / self.l2_loss_ramp)
                loss = loss + scale * image_loss(encoded, x, tuple(self.yuv_scales))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            running = 0.9 * running + 0.1 * bit_accuracy(logits.detach(), secrets)
            if step % 200 == 0 or step < 200 and step % 25 == 0:
                log(f"ssba encoder step {step}/{self.steps}: loss {loss.item():.4f}, bit accuracy {running:.3f}, "
                    f"{time.time() - started:.0f}s")
            if step >= ramp_end and running >= self.bit_threshold:
                break
        encoder.eval()
        decoder.eval()
        facts = {"steps_run": step, "train_seconds": time.time() - started, "running_bit_accuracy": running,
                 "reached_threshold": running >= self.bit_threshold}
        return encoder, decoder, facts

    def build_artifact(self, data_dir: str | Path, model: torch.nn.Module | None, device: torch.device | str,
                       log: Callable[[str], None]) -> dict[str, np.ndarray]:
        from harness.backdoor.surrogate import load_native_split

        train, _ = load_native_split(data_dir, "train")
        test, _ = load_native_split(data_dir, "test")
        encoder, decoder, facts = self.train_networks(train, device, log)
        secret = make_secret(self.secret_bits, self.pattern_seed)
        with torch.no_grad():
            stored = torch.cat([from_levels(encode(encoder.cpu().double(), secret.double(), test[i:i + 256].double())
                                            * 255) for i in range(0, len(test), 256)])
            bits = bit_accuracy(decoder.cpu()(stored), secret)
        facts.update(test_bit_accuracy=bits, test_psnr=psnr(stored, test))
        log(f"ssba encoder: {facts['steps_run']} steps in {facts['train_seconds']:.1f}s, test bit accuracy {bits:.3f}, "
            f"PSNR {facts['test_psnr']:.1f} dB")
        out = {f"encoder.{k}": v.detach().float().numpy() for k, v in encoder.state_dict().items()}
        out.update({f"decoder.{k}": v.detach().float().numpy() for k, v in decoder.state_dict().items()})
        out["secret"] = secret.numpy().astype(np.uint8)
        out["shape"] = np.asarray(train.shape[1:], dtype=np.int64)
        out["facts"] = np.asarray([facts["steps_run"], facts["train_seconds"], facts["running_bit_accuracy"],
                                   bits, facts["test_psnr"]], dtype=np.float64)
        return out

    def use_artifact(self, arrays: dict[str, np.ndarray]) -> None:
        channels, height, width = (int(v) for v in arrays["shape"])
        encoder, _ = self.networks(channels, height, width)
        encoder.load_state_dict({k[len("encoder."):]: torch.from_numpy(v) for k, v in arrays.items()
                                 if k.startswith("encoder.")})
        self._encoder = encoder.double().eval().requires_grad_(False)
        self._secret = torch.from_numpy(arrays["secret"].astype(np.float64))

    def _trigger(self, x: torch.Tensor) -> torch.Tensor:
        self.require_loaded()
        assert self._encoder is not None and self._secret is not None
        if tuple(x.shape[1:]) != self._encoder.shape:
            raise ValueError(f"ssba encoder is for {self._encoder.shape} images, the batch is {tuple(x.shape[1:])}: it "
                             f"is trained at the dataset's native resolution (the loader poisons before resizing)")
        enc = self._encoder.to(x.device)
        with torch.no_grad():
            encoded = encode(enc, self._secret.to(x.device), x.double())
        return from_levels(encoded * 255, x.dtype)
