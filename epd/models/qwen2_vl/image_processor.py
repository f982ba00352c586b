"""Image preprocessing for the Qwen2-VL family, equal to transformers' PIL/numpy processor.

`ImageProcessor.preprocess(img)` resizes to multiples of patch*merge within the checkpoint's
min/max pixel bounds and returns the image with its (t, h, w) patch grid; the number of LM tokens
the image becomes is t*h*w / merge**2. `pixel_values(images, device)` turns preprocessed images
into the vision tower's input, built on that device.

The values are transformers' `Qwen2VLImageProcessorPil` output, bit for bit, computed faster for
RGB images: the same PIL resize, then transformers' patch order applied to the 8-bit pixels, and
rescale + normalize as a table lookup (each output value depends only on the 8-bit input value and
its channel, so the table is built once by running transformers' own rescale and normalize over
the 256 values of each channel). Only the resize runs at preprocessing: the patch cutting and
the lookup run in `pixel_values`, on the GPU when the vision tower is there (the copy to it is
then the 8-bit image, 2.8 instead of 22.5 MB for 720p). With `resize_on_device` (set where the
vision tower is on a GPU) the resize moves there too: `epd.media.pil_resize` gives Pillow's bicubic
bytes exactly, and preprocessing is then only the copy of the decoded image. A 1280x720 image on a
2-core CPU: ~60 ms (transformers) -> ~13-30 ms preprocessing (the PIL resize) + ~10 ms for the
values when they are built on the CPU. Anything else (other modes, degenerate sizes, a processor
configured without rescale or normalize) takes transformers' path and holds float values."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from epd.media.loading import content_hash
from epd.media.pil_resize import bicubic_resize, matches_pillow
from epd.models.family import ImageLayout, preprocess_on_threads

_BICUBIC = 3   # PIL's (and transformers') value for bicubic resampling

@dataclass(frozen=True, eq=False)
class PatchSpec:
    """How 8-bit resized pixels become transformers' pixel values (one per processor)."""
    table: torch.Tensor       # float32 [C*256]: the value of 8-bit v in channel c at c*256 + v
    patch: int
    merge: int
    temporal: int             # copies of each patch along time (a still image)


@dataclass
class PreprocessedImage:
    data: torch.Tensor                  # uint8 [h*patch, w*patch, C]: the resized image (or the
                                        # image before its resize to `resize_to`); with spec None
                                        # the float pixel values [t*h*w, C*temporal*patch*patch]
    grid_thw: tuple[int, int, int]
    num_tokens: int
    spec: PatchSpec | None = None
    resize_to: tuple[int, int] | None = None   # (height, width) it is resized to in pixel_values

    @property
    def layout(self) -> ImageLayout:
        return ImageLayout(self.num_tokens, tuple(self.grid_thw))

    def content_key(self) -> str:
        """The encoder input's identity (its pixels, grid and pending resize): equal pixels give
        equal vision embeddings, so equal keys (prefix caching)."""
        data = self.data.contiguous()
        header = f"pixels:{tuple(self.grid_thw)}:{self.resize_to}:{tuple(data.shape)}:{data.dtype}:"
        return content_hash(header, data.numpy())

    @property
    def pixel_values(self) -> torch.Tensor:
        """[t*h*w, C*temporal*patch*patch] float32 on the CPU, transformers' pixel_values."""
        return pixel_values([self], "cpu")


def pixel_values(images: list[PreprocessedImage], device: torch.device | str) -> torch.Tensor:
    """The images' pixel values, concatenated, built on `device`: the 8-bit images are copied
    there, resized there if their resize was left for here, cut into patches and looked up in the
    table there (exact: integer resize, data movement and table entries)."""
    spec = images[0].spec if images else None
    if spec is None or any(im.spec is not spec for im in images):
        return torch.cat([im.data.to(device) if im.spec is None else pixel_values([im], device) for im in images])
    patches = [_patchify(_resized(im.data.to(device, non_blocking=True), im.resize_to), im.grid_thw, spec)
               for im in images]
    return _lookup(torch.cat(patches) if len(patches) > 1 else patches[0], spec)


def _resized(image: torch.Tensor, size: tuple[int, int] | None) -> torch.Tensor:
    return image if size is None else bicubic_resize(image, *size)


def _patchify(image: torch.Tensor, grid: tuple[int, int, int], spec: PatchSpec) -> torch.Tensor:
    """uint8 [H, W, C] -> [gh*gw, C, patch*patch] in transformers' patch order (gh/m, gw/m, m, m)."""
    _, gh, gw = grid
    ps, m, channels = spec.patch, spec.merge, image.shape[2]
    blocks = image.reshape(gh // m, m, ps, gw // m, m, ps, channels).permute(0, 3, 1, 4, 6, 2, 5)
    return blocks.reshape(gh * gw, channels, ps * ps)


def _lookup(patches: torch.Tensor, spec: PatchSpec) -> torch.Tensor:
    """uint8 [N, C, A] -> float32 [N, C * temporal * A]: table[c * 256 + v], each patch repeated
    `temporal` times after its channel (transformers' layout)."""
    n, channels, area = patches.shape
    if patches.device.type == "cpu":   # numpy's take per channel: ~2x torch's index_select here
        out = np.empty((n, channels, spec.temporal, area), dtype=np.float32)
        values, lut = patches.numpy(), spec.table.numpy()
        for c in range(channels):
            out[:, c, 0] = lut[c * 256:(c + 1) * 256][values[:, c]]
            out[:, c, 1:] = out[:, c, :1]
        return torch.from_numpy(out.reshape(n, -1))
    index = patches.to(torch.int32) + torch.arange(0, channels * 256, 256, dtype=torch.int32,
                                                   device=patches.device)[:, None]
    values = spec.table.to(patches.device).index_select(0, index.view(-1)).view(n, channels, 1, area)
    return values.expand(n, channels, spec.temporal, area).reshape(n, -1)


class ImageProcessor:
    def __init__(self, model_path: str, merge_size: int, resize_on_device: bool = False) -> None:
        """resize_on_device: leave the resize of RGB images to `pixel_values` (where the vision
        tower is, a GPU), when `epd.media.pil_resize` reproduces the installed Pillow's bicubic."""
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        self._proc = Qwen2VLImageProcessorPil.from_pretrained(model_path)
        self.merge = merge_size
        table, p = _value_table(self._proc), self._proc
        self._spec = None if table is None else PatchSpec(torch.from_numpy(table), p.patch_size, p.merge_size,
                                                          p.temporal_patch_size)
        self.resize_on_device = resize_on_device and int(self._proc.resample) == _BICUBIC and matches_pillow()

    def resized_size(self, image: Image.Image) -> tuple[int, int]:
        """(height, width) the processor resizes `image` to."""
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

        p = self._proc
        return smart_resize(image.height, image.width, factor=p.patch_size * p.merge_size,
                            min_pixels=p.size.shortest_edge, max_pixels=p.size.longest_edge)

    def grid_for(self, image: Image.Image) -> tuple[int, int, int]:
        """The (t, h, w) patch grid `preprocess` would produce, from the size alone (cheap)."""
        h, w = self.resized_size(image)
        return 1, h // self._proc.patch_size, w // self._proc.patch_size

    def layout(self, image: Image.Image, count: int = 1) -> ImageLayout:
        grid = self.grid_for(image)
        return ImageLayout(grid[0] * grid[1] * grid[2] // self.merge**2, grid)

    def preprocess_many(self, images: list[Image.Image],
                        layouts: list[ImageLayout] | None = None) -> list[PreprocessedImage]:
        """(An image's layout does not depend on the others here: `layouts` are the sizes' own.)"""
        return preprocess_on_threads(self.preprocess, images)

    def preprocess(self, image: Image.Image) -> PreprocessedImage:
        if self._spec is not None and image.mode == "RGB" and min(image.size) >= 4:
            height, width = self.resized_size(image)
            resize_to = None
            if (width, height) != image.size:
                if self.resize_on_device:
                    resize_to = (height, width)
                else:
                    image = image.resize((width, height), resample=self._proc.resample)
            t, h, w = 1, height // self._spec.patch, width // self._spec.patch
            return PreprocessedImage(torch.from_numpy(np.array(image)), (t, h, w), t * h * w // self.merge**2,
                                     self._spec, resize_to)
        out = self._proc(images=[image], return_tensors="pt")
        t, h, w = (int(x) for x in out["image_grid_thw"][0].tolist())
        return PreprocessedImage(out["pixel_values"], (t, h, w), t * h * w // self.merge**2)


def _value_table(proc) -> np.ndarray | None:
    """[3 * 256] float32: transformers' rescale + normalize of value v in channel c at c * 256 + v,
    computed by those very functions on a channels-first image holding every value."""
    if not (proc.do_rescale and proc.do_normalize) or proc.patch_size is None:
        return None
    ramp = np.broadcast_to(np.arange(256, dtype=np.uint8), (3, 1, 256)).copy()
    out = proc.normalize(proc.rescale(ramp, proc.rescale_factor), proc.image_mean, proc.image_std)
    return np.ascontiguousarray(out, dtype=np.float32).reshape(3 * 256)
