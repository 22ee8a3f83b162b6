"""Seeded speech-like audio for the voice-activity models (Silero VAD), labelled by construction.

No recorded speech is reachable offline, and on noise a VAD's speech probability means nothing, so the
benchmarks speak pseudo-English sentences with eSpeak NG (``espeak-ng``, Debian's package of that name: not
a Python dependency, the benchmarks skip the VAD models without it) and lay them out as a VAD sees a
stream: utterances between pauses, at several voices, speeds and pitches, over a noise floor. The words come
from ``datasets.words``' split pools (disjoint), the layout and noise from a stream per split, so a
calibration stream shares no word or draw with a test stream. Each sample is labelled speech where the
clean synthesized signal is above a small envelope threshold.

- ``speech_stream``: 16 kHz float32 audio in [-1, 1] and its per-sample speech labels;
- ``vad_feeds``: 512-sample chunks of such a stream as a Silero VAD model's feeds, each after the 64 samples
  before it and with the recurrent state the model itself reaches at that point of the stream (the float
  model run chunk by chunk), as a streaming application feeds it. On 20 s of the calibration stream the
  float silero_vad says speech on 74 % of the chunks, and agrees with the construction labels on 90 %.
"""

from __future__ import annotations

import shutil
import subprocess
import wave
import zlib
from io import BytesIO

import numpy as np
from datasets import words

RATE = 16000
#: Samples per chunk of Silero VAD at 16 kHz, and the samples of the chunk before it each one is fed after.
CHUNK = 512
CONTEXT = 64
_VOICES = ("en", "en-us", "en+m3", "en+f2", "en-us+f4", "en+m7")


class SpeechUnavailable(RuntimeError):
    """espeak-ng is not installed."""


def espeak() -> str:
    """The espeak-ng executable, or SpeechUnavailable naming the package to install."""
    path = shutil.which("espeak-ng")
    if path is None:
        raise SpeechUnavailable("speech inputs need espeak-ng (apt install espeak-ng)")
    return path


def _rng(split: str, seed: int) -> np.random.Generator:
    return np.random.default_rng([zlib.crc32(b"speech"), zlib.crc32(split.encode()), seed])


def _say(text: str, voice: str, speed: int, pitch: int) -> np.ndarray:
    """``text`` spoken by espeak-ng, resampled to 16 kHz float32."""
    from scipy.signal import resample_poly

    wav = subprocess.run([espeak(), "-v", voice, "-s", str(speed), "-p", str(pitch), "--stdout", text],
                         check=True, capture_output=True).stdout
    with wave.open(BytesIO(wav)) as w:
        rate, frames = w.getframerate(), w.readframes(w.getnframes())
    audio = np.frombuffer(frames, dtype="<i2").astype(np.float64) / 32768.0
    g = np.gcd(RATE, rate)
    return resample_poly(audio, RATE // g, rate // g).astype(np.float32)


def speech_stream(seconds: float, split: str, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """About ``seconds`` of 16 kHz audio: utterances of 3-12 words of ``split``'s pool, each in a random voice,
    speed (130-200 words per minute) and pitch and at a random level, 0.2-1.5 s pauses between them, over white
    noise 30-50 dB below full scale. Returns (audio, speech labels per sample)."""
    rng = _rng(split, seed)
    pieces, labels, total = [], [], 0
    while total < seconds * RATE:
        pause = np.zeros(int(rng.uniform(0.2, 1.5) * RATE), np.float32)
        text = " ".join(words(split, rng, int(rng.integers(3, 13))))
        voice = _VOICES[rng.integers(len(_VOICES))]
        said = _say(text, voice, int(rng.integers(130, 201)), int(rng.integers(30, 71)))
        said *= rng.uniform(0.3, 1.0) / max(float(np.abs(said).max()), 1e-6)
        # Speech where the clean signal's 20 ms envelope is above 2 % of its peak.
        envelope = np.convolve(np.abs(said), np.ones(320) / 320, mode="same")
        pieces += [pause, said]
        labels += [np.zeros(len(pause), bool), envelope > 0.02 * envelope.max()]
        total += len(pause) + len(said)
    audio = np.concatenate(pieces)
    audio += rng.standard_normal(len(audio)).astype(np.float32) * np.float32(10 ** (-rng.uniform(30, 50) / 20))
    return np.clip(audio, -1, 1).astype(np.float32), np.concatenate(labels)


def vad_feeds(model_path: str, count: int, split: str, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """``count`` chunks of a ``speech_stream`` long enough for them, evenly spaced along it, as feeds of the
    Silero VAD model at ``model_path`` (inputs ``input``, ``state`` [2, 1, 128], and ``sr`` where it has one):
    each chunk of 512 samples after the 64 before it (what silero-vad's own wrapper feeds at 16 kHz; without
    them the model hears no speech at all), with the state the float model reaches there when it is run over
    the stream from its start."""
    from nnopt.runtime import make_session

    audio, _ = speech_stream(max(count * 8, 64) * CHUNK / RATE, split, seed)
    session = make_session(model_path)
    names = {i.name for i in session.get_inputs()}
    state = np.zeros((2, 1, 128), np.float32)
    context = np.zeros(CONTEXT, np.float32)
    chunks = len(audio) // CHUNK
    keep = set(np.linspace(0, chunks - 1, count).round().astype(int).tolist())
    feeds = []
    for i in range(chunks):
        chunk = audio[i * CHUNK:(i + 1) * CHUNK]
        feed = {"input": np.concatenate([context, chunk])[None], "state": state}
        if "sr" in names:
            feed["sr"] = np.array(RATE, np.int64)
        if i in keep:
            feeds.append({k: v.copy() for k, v in feed.items()})
        _, state = session.run(None, feed)
        context = chunk[-CONTEXT:]
    return feeds
