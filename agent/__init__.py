"""qwen3tts-agent: a WebRTC bridge that puts a qwen3tts-rt TTS server on a browser or phone call.

Microphone audio comes in over WebRTC, a voice-activity detector takes turns, an optional
ASR endpoint transcribes, an OpenAI-compatible LLM writes the reply token by token, every
token goes into one ``StreamSynthesize`` call of the TTS server as it arrives, and the
speech goes back on the call in 20 ms frames. User speech over the agent (barge-in) stops
the audio within one frame and cancels the TTS stream and the LLM request.

The agent reaches the TTS only through its gRPC API (``qwen3tts_rt.v1``).
"""

__version__ = "0.1.0"
