"""Voice-agent framework plugins over the qwen3tts-rt ``StreamSynthesize`` API.

* ``qwen3tts_rt.integrations.pipecat``: ``Qwen3TTSService`` for Pipecat (``pip install
  qwen3tts-rt[pipecat]``).
* ``qwen3tts_rt.integrations.livekit``: ``TTS`` for LiveKit Agents (``pip install
  qwen3tts-rt[livekit]``).

Both speak to a running server (``qwen3tts-rt serve``) over one gRPC channel per
plugin instance, send the LLM's text as it arrives (no sentence aggregation), and map
each framework utterance onto a *named utterance* of the server (``BeginUtterance``),
so that an interruption cancels that utterance in-band (``Cancel{key}``). The shared
connection code is ``qwen3tts_rt.integrations.link``.
"""
