"""The one exception type that bad video data turns into."""

from __future__ import annotations

from typing import Literal, get_args

__all__ = ["DecodeErrorReason", "VideoDecodeError"]

DecodeErrorReason = Literal[
    "empty", "not_a_video", "no_video_stream", "truncated", "corrupt", "too_large", "too_long", "timeout"
]
_REASONS = frozenset(get_args(DecodeErrorReason))


class VideoDecodeError(Exception):
    """A video that cannot be read or decoded.

    Attributes:
        reason: Machine-readable cause, one of ``empty``, ``not_a_video``, ``no_video_stream``, ``truncated``,
            ``corrupt``, ``too_large`` (pictures), ``too_long`` (the clips asked for would not fit the memory limit)
            or ``timeout``; pipelines store it as the row's status. ``truncated`` means no video packet could be read
            (or the header is cut off, or the file ends before the media data its header indexes and no frame
            decodes); a video cut off part-way decodes the frames it holds, with their duration. A whole MP4 (its
            media data there) whose index points outside it reads no packet either: ``corrupt``.
        message: Human-readable detail, including FFmpeg's own message where there is one.
    """

    def __init__(self, reason: DecodeErrorReason, message: str) -> None:
        if reason not in _REASONS:
            raise ValueError(f"reason must be one of {sorted(_REASONS)}, got {reason!r}")
        super().__init__(f"{reason}: {message}")
        self.reason: DecodeErrorReason = reason
        self.message = message

    def __reduce__(self) -> tuple[type[VideoDecodeError], tuple[str, str]]:
        # Keep the reason when the error crosses a process boundary (Ray tasks pickle exceptions).
        return (type(self), (self.reason, self.message))
