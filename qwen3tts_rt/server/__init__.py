"""The gRPC server: the ``qwen3tts_rt.v1.TextToSpeech`` API, the Riva-compatible
``nvidia.riva.tts.RivaSpeechSynthesis`` API, health, reflection, auth, TLS, metrics.

Entry points: ``app.TTSServer`` / ``app.serve`` / ``app.ServerThread`` with a
``config.ServerConfig``; ``client.say`` for streaming text in like an LLM.
"""
