"""Every Prometheus metric of the agent, in one module, with explicit buckets.

Names (all prefixed ``qwen3tts_agent_``, so they can share a registry with the TTS server's):

* ``response_latency_seconds{input}`` — end of user speech (last voiced frame; ``input="voice"``)
  or typed text received (``input="text"``) -> first agent audio frame sent on the call.
  Voice turns include the stop hysteresis and the ASR.
* ``first_token_to_audio_seconds{mode}`` — first LLM token (``mode="llm"``) or the text of a
  say-mode turn (``mode="say"``) handed to the TTS -> first agent audio frame sent.
* ``barge_in_stop_seconds`` — barge-in decision -> first silent frame sent in place of the
  agent's audio (the outbound track sends a frame every 20 ms).
* ``llm_first_token_seconds`` — LLM request sent -> first token; ``asr_seconds`` — transcription.
* ``peers`` — live peer connections; ``turns_total{input,outcome}``; ``barge_ins_total``;
  ``errors_total{service}``.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

# Dense between 10 ms and 2 s (conversational response times), sparse beyond.
LATENCY_BUCKETS: tuple[float, ...] = (
    0.010, 0.020, 0.030, 0.040, 0.050, 0.060, 0.080, 0.100, 0.120, 0.150, 0.200, 0.250,
    0.300, 0.400, 0.500, 0.600, 0.700, 0.800, 0.900, 1.000, 1.250, 1.500, 2.000, 2.500,
    3.000, 4.000, 5.000, 7.500, 10.00, 20.00,
)  # fmt: skip
# Barge-in stops are at most one 20 ms frame when the loop keeps up: 1 ms resolution there.
STOP_BUCKETS: tuple[float, ...] = (
    0.001, 0.002, 0.004, 0.006, 0.008, 0.010, 0.012, 0.014, 0.016, 0.018, 0.020, 0.022,
    0.025, 0.030, 0.040, 0.050, 0.075, 0.100, 0.200, 0.500,
)  # fmt: skip

RESPONSE_LATENCY = Histogram(
    "qwen3tts_agent_response_latency_seconds",
    "End of user speech (last voiced frame) or typed text received -> first agent audio frame sent",
    ["input"],
    buckets=LATENCY_BUCKETS,
)
FIRST_TOKEN_TO_AUDIO = Histogram(
    "qwen3tts_agent_first_token_to_audio_seconds",
    "First LLM token (or say-mode text) handed to the TTS -> first agent audio frame sent",
    ["mode"],
    buckets=LATENCY_BUCKETS,
)
BARGE_IN_STOP = Histogram(
    "qwen3tts_agent_barge_in_stop_seconds",
    "Barge-in decision -> first silent frame sent in place of the agent's audio",
    buckets=STOP_BUCKETS,
)
LLM_FIRST_TOKEN = Histogram(
    "qwen3tts_agent_llm_first_token_seconds",
    "LLM request sent -> first token received",
    buckets=LATENCY_BUCKETS,
)
ASR_LATENCY = Histogram(
    "qwen3tts_agent_asr_seconds",
    "Transcription request -> answer",
    buckets=LATENCY_BUCKETS,
)
PEERS = Gauge("qwen3tts_agent_peers", "Live peer connections")
TURNS = Counter(
    "qwen3tts_agent_turns",
    "Agent replies by input (voice, text) and outcome (completed, interrupted, failed, empty)",
    ["input", "outcome"],
)
BARGE_INS = Counter("qwen3tts_agent_barge_ins", "Replies interrupted by the user")
ERRORS = Counter("qwen3tts_agent_errors", "Upstream failures by service (tts, llm, asr)", ["service"])
