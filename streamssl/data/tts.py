"""Speech synthesis with eSpeak NG through the ``espeakng-loader`` wheel (its own library and voices).

Only what the transcribed demo corpus needs: a voice (language + variant), pitch, pitch range and
speaking rate, a seed for the noise of breathy voices, and ``synthesize(text) -> float32 audio at
16 kHz``. libespeak-ng keeps global state, so one ``Espeak`` object serves a process; it is not
thread-safe.

Why a wheel and not the system's espeak-ng: the corpus must be made on a fresh machine from pip
packages alone, with the same voices everywhere.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import numpy as np

_AUDIO_OUTPUT_SYNCHRONOUS = 2
_POS_CHARACTER = 1
_CHARS_UTF8 = 1
_RATE, _PITCH, _RANGE, _WORDGAP = 1, 3, 4, 7
_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)


class SynthesisUnavailable(RuntimeError):
    """The ``espeakng-loader`` package (eSpeak NG) is not installed or its library does not load."""


@dataclass(frozen=True)
class Voice:
    """One synthetic speaker.

    Attributes:
        language: an eSpeak NG English voice ("en", "en-us", "en-gb-x-rp", ...).
        variant: a voice variant file ("m3", "f2", "klatt4", "Andy", ...).
        pitch: base pitch, 0-99 (eSpeak's scale; 50 is the voice's default).
        pitch_range: pitch variation, 0-99.
        rate: words per minute.
        word_gap: extra pause between words, in units of 10 ms.
    """

    language: str
    variant: str
    pitch: int
    pitch_range: int
    rate: int
    word_gap: int = 0

    @property
    def name(self) -> str:
        return f"{self.language}+{self.variant}"


class Espeak:
    """A handle on libespeak-ng (from the ``espeakng-loader`` wheel) that renders text to audio.

    Args:
        sample_rate: rate of the returned audio; eSpeak renders at 22050 Hz and soxr resamples.
    """

    def __init__(self, sample_rate: int = 16000):
        try:
            import espeakng_loader
        except ImportError:
            raise SynthesisUnavailable(
                "the transcribed demo corpus needs eSpeak NG: pip install espeakng-loader"
            ) from None
        try:
            self._lib = ctypes.CDLL(espeakng_loader.get_library_path())
        except OSError as e:
            raise SynthesisUnavailable(f"libespeak-ng from espeakng-loader does not load: {e}") from None
        lib = self._lib
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.espeak_Synth.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int, ctypes.c_uint,
                                     ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]
        rate = lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, espeakng_loader.get_data_path().encode(), 0)
        if rate <= 0:
            raise SynthesisUnavailable(f"espeak_Initialize failed ({rate})")
        self.native_rate, self.sample_rate = int(rate), int(sample_rate)
        self._chunks: list[np.ndarray] = []

        def collect(wav, n, events):
            if n > 0:
                self._chunks.append(np.ctypeslib.as_array(wav, shape=(n,)).copy())
            return 0

        self._callback = _CALLBACK(collect)  # kept alive as long as the handle
        lib.espeak_SetSynthCallback(self._callback)
        # The breathy and whispering variants mix in noise from eSpeak NG's own generator, whose
        # state otherwise differs from process to process (measured: 7 % of the demo corpus's files
        # changed between two builds). espeak_ng_SetRandSeed exists from eSpeak NG 1.52 on.
        self._set_rand_seed = getattr(lib, "espeak_ng_SetRandSeed", None)
        if self._set_rand_seed is not None:
            self._set_rand_seed.argtypes = [ctypes.c_long]

    def set_voice(self, voice: Voice) -> None:
        """Select the voice for the next ``synthesize`` calls. Raises ValueError for an unknown voice."""
        if self._lib.espeak_SetVoiceByName(voice.name.encode()) != 0:
            raise ValueError(f"voice: eSpeak NG has no voice {voice.name!r}")
        for param, value in ((_RATE, voice.rate), (_PITCH, voice.pitch), (_RANGE, voice.pitch_range),
                             (_WORDGAP, voice.word_gap)):
            self._lib.espeak_SetParameter(param, int(value), 0)

    def seed(self, value: int) -> bool:
        """Seed eSpeak NG's noise generator for the next ``synthesize`` calls; returns False where the
        library cannot be seeded (older than eSpeak NG 1.52), so that noisy voices vary between runs.

        With a seed, the audio is a function of the sequence of calls since ``Espeak()`` (the
        synthesiser also keeps filter state from one utterance to the next)."""
        if self._set_rand_seed is None:
            return False
        self._set_rand_seed(int(value) % 2**31)
        return True

    def synthesize(self, text: str) -> np.ndarray:
        """Render ``text`` with the current voice: (N,) float32 in [-1, 1) at ``sample_rate``."""
        import soxr

        data = text.encode("utf-8")
        self._chunks.clear()
        err = self._lib.espeak_Synth(data, len(data) + 1, 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None)
        self._lib.espeak_Synchronize()
        if err != 0:
            raise RuntimeError(f"espeak_Synth failed ({err}) for {text!r}")
        pcm = np.concatenate(self._chunks) if self._chunks else np.zeros(0, np.int16)
        audio = pcm.astype(np.float32) / 32768.0
        if self.sample_rate != self.native_rate:
            audio = soxr.resample(audio, self.native_rate, self.sample_rate, quality="HQ").astype(np.float32)
        return audio
