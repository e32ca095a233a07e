"""State storage codecs: how a moment is kept between steps (allocate, decode, encode)."""

from adamkit.storage.float import FloatCodec, codec_for

__all__ = ["FloatCodec", "codec_for"]
