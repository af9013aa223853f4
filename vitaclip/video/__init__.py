"""Video decoding for Vita-CLIP: probe, sample by timestamp, decode only the frames needed.

Sources are local paths, encoded bytes or seekable binary file-like objects (an S3 object read with ranged reads
works without a temporary file). Bad videos raise ``VideoDecodeError`` with a machine-readable ``reason``.
"""

from vitaclip.video._container import SeekableReader, VideoSource
from vitaclip.video.decode import DEFAULT_MAX_PIXELS, Clip, DecodeStats, decode_clip, decode_clips
from vitaclip.video.errors import DecodeErrorReason, VideoDecodeError
from vitaclip.video.probe import VideoInfo, probe
from vitaclip.video.sampling import Sampling, dense_indices, frame_indices_at, uniform_times, window_bounds
from vitaclip.video.transforms import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD, frames_to_tensor

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "OPENAI_DATASET_MEAN",
    "OPENAI_DATASET_STD",
    "Clip",
    "DecodeErrorReason",
    "DecodeStats",
    "Sampling",
    "SeekableReader",
    "VideoDecodeError",
    "VideoInfo",
    "VideoSource",
    "decode_clip",
    "decode_clips",
    "dense_indices",
    "frame_indices_at",
    "frames_to_tensor",
    "probe",
    "uniform_times",
    "window_bounds",
]
