"""qwen3tts-rt: real-time streaming serving for Qwen3-TTS."""

__version__ = "0.1.0"
