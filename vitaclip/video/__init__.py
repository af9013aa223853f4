"""Video decoding for Vita-CLIP: probe, sample by timestamp, decode only the frames needed.

Open a video once with `VideoDecoder` and ask it for clips by a sampling spec (`Uniform`, `Dense`, `Windows`) and
for what it holds (`info`); `decode_clips`, `decode_clip` and `probe` are one-call forms. Sources are local paths,
encoded bytes or seekable binary file-like objects (an S3 object read with ranged reads works without a temporary
file). Bad videos raise ``VideoDecodeError`` with a machine-readable ``reason``.
"""

from vitaclip.video._container import SeekableReader, VideoSource, open_options
from vitaclip.video.decode import (
    DEFAULT_MAX_FRAME_BYTES,
    DEFAULT_MAX_PIXELS,
    Clip,
    Crop,
    DecodeStats,
    VideoDecoder,
    closing_source,
    decode_clip,
    decode_clips,
    decode_or_error,
)
from vitaclip.video.errors import DecodeErrorReason, VideoDecodeError
from vitaclip.video.probe import VideoInfo, probe
from vitaclip.video.sampling import (
    Dense,
    Sampling,
    SamplingSpec,
    Uniform,
    Windows,
    dense_indices,
    frame_indices_at,
    sampling_spec,
    uniform_times,
    window_bounds,
    window_count,
)
from vitaclip.video.transforms import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD, frames_to_tensor, normalize_frames

__all__ = [
    "DEFAULT_MAX_FRAME_BYTES",
    "DEFAULT_MAX_PIXELS",
    "OPENAI_DATASET_MEAN",
    "OPENAI_DATASET_STD",
    "Clip",
    "Crop",
    "DecodeErrorReason",
    "DecodeStats",
    "Dense",
    "Sampling",
    "SamplingSpec",
    "SeekableReader",
    "open_options",
    "Uniform",
    "VideoDecoder",
    "VideoDecodeError",
    "VideoInfo",
    "VideoSource",
    "Windows",
    "closing_source",
    "decode_clip",
    "decode_clips",
    "decode_or_error",
    "dense_indices",
    "frame_indices_at",
    "frames_to_tensor",
    "normalize_frames",
    "probe",
    "sampling_spec",
    "uniform_times",
    "window_bounds",
    "window_count",
]
