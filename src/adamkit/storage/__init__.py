"""State storage codecs: how a moment is kept between steps (allocate, decode, encode)."""

from adamkit.storage.float import FloatCodec

__all__ = ["FloatCodec"]
