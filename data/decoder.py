"""Arguments of DALI's image decoder: which device decodes, and how much memory the GPU decoder reserves.

Memory of the mixed (nvJPEG, via nvImageCodec) decoder. When its pipeline is built, DALI 2.4 allocates, per
decoder thread (`threads`), one device buffer of `device_memory_padding` bytes and two pinned host buffers of
`host_memory_padding` bytes (double buffering), then hands them to its memory pools, which keep them until the
process exits; later allocations of nvJPEG are padded by the same amounts, so that a larger image seldom needs
a reallocation. DALI's defaults are 16 MiB and 8 MiB. NVIDIA's ResNet-50 example uses 211,025,920 and 140,544,512
bytes, sized for ImageNet's largest files: at 4 threads that is 0.84 GB of GPU and 1.12 GB of pinned host memory
per decoder, pure waste for 32-pixel images, and multiplied by every pipeline alive at once.

The rule, decided per loader from the data:
- the widths and heights of up to SAMPLED_IMAGES images spread evenly over the index (files of a folder,
  members of tar shards) are read from their headers (no decoding; a few milliseconds);
- a training loader over "photo" data, whose largest sampled side exceeds LARGE_IMAGE_SIDE, gets the ImageNet
  example's paddings, and `preallocate_width_hint` / `preallocate_height_hint` set to the largest sampled width
  and height (the hardware decoder reserves a batch of images of that size up front; without a hint it reserves
  for 1 x 1 and grows as it meets images). The sample sees typical files, not the rare huge ones of a photo
  collection: the paddings are what covers those;
- everything else takes DALI's defaults: thumbnail data (CIFAR, STL-10, Tiny ImageNet, the built-in digits: a
  256 x 256 RGB image is 192 KiB, far below the default buffers), and every evaluation loader (kNN monitor,
  raw-feature pass, linear validation), which would otherwise hold a second set of large pools beside the
  training loader's while both are alive.

`jpeg_fancy_upsampling=True` on the mixed decoder: it then upsamples the chroma of subsampled JPEGs (4:2:0, most
photos) the way libjpeg-turbo, DALI's CPU decoder, always does; DALI 2.4 leaves it off by default, and the two
devices then decode different pixels, so a run's images (and kNN numbers) would depend on the device that decoded
them (grey images such as the built-in digits carry no chroma to upsample). `bench/data.py --devices cpu gpu`
measures what difference remains.

`hw_decoder_load` (kept at DALI's default, 0.65): on GPUs with a hardware JPEG engine (A100, H100), the share
of each batch's JPEGs sent to that engine; the rest go to nvJPEG's CUDA decoder, whose Huffman stage runs on
the decoder's CPU threads. The best share depends on the number of threads and on what else uses the SMs:
NVIDIA advises finding it empirically; raise it when the CPU threads are the bottleneck.
"""
from PIL import Image

SAMPLED_IMAGES = 64
LARGE_IMAGE_SIDE = 256  # pixels; ImageNet's files are mostly 500 x 375 or 500 x 333, thumbnails sets 32 to 96
IMAGENET_EXAMPLE_PADDING = dict(device_memory_padding=211_025_920, host_memory_padding=140_544_512)  # bytes


def decoder_arguments(index, device, *, training):
    """Keyword arguments of `fn.decoders.image` for decoding `index` on device 'cpu' or 'gpu'."""
    if device == "cpu":
        return dict(device="cpu")
    return mixed_decoder_arguments(sample_image_sizes(index), training=training)


def mixed_decoder_arguments(image_sizes, *, training):
    """Arguments of the GPU decoder for data whose sampled (width, height) sizes are `image_sizes` (the rule above)."""
    arguments = dict(device="mixed", jpeg_fancy_upsampling=True)
    largest_width = max((width for width, _ in image_sizes), default=0)
    largest_height = max((height for _, height in image_sizes), default=0)
    if training and max(largest_width, largest_height) > LARGE_IMAGE_SIDE:
        arguments.update(IMAGENET_EXAMPLE_PADDING, preallocate_width_hint=largest_width,
                         preallocate_height_hint=largest_height)
    return arguments


def sample_image_sizes(index, count=SAMPLED_IMAGES):
    """(width, height) of up to `count` images spread evenly over the index's ids, read from their headers;
    a file whose header cannot be read is left out (the decoder will report it if it is really broken)."""
    step = max(1, index.num_instances // count)
    sizes = []
    for instance in range(0, index.num_instances, step)[:count]:
        try:
            with index.open_image(instance) as file, Image.open(file) as image:
                sizes.append(image.size)
        except (OSError, Image.DecompressionBombError):
            continue
    return sizes
