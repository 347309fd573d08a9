// qwen3tts-agent page: one WebRTC call to the agent (microphone up, agent voice down, a data
// channel for text and events). Plain JavaScript, no build step.
"use strict";

const $ = (id) => document.getElementById(id);
const ui = {
  connect: $("connect"), disconnect: $("disconnect"), mic: $("mic"), playback: $("playback"),
  conn: $("conn"), vad: $("vad"), level: $("level"), mode: $("mode"), form: $("say"),
  text: $("text"), send: $("send"), stop: $("stop"), transcript: $("transcript"),
  latency: document.querySelector("#latency tbody"), remote: $("remote"),
};

let pc = null;
let dc = null;
let micStream = null;
let audioCtx = null;
let analyser = null;
let levelTimer = null;
let peakLevel = 0; // highest agent output level seen by the analyser (0..1)
let delayTimer = null;
let delaySnap = null; // the last getStats totals of the agent's audio (see pollReceiveDelay)
let receiveDelayMs = null; // this browser's recent receive delay for the agent's audio
const agentLines = new Map(); // turn -> <li> of the agent's reply
const latencyRows = new Map(); // turn -> <tr>
const messages = []; // every data-channel message received (for tests and debugging)

function setConnected(on) {
  ui.connect.disabled = on;
  ui.disconnect.disabled = !on;
  ui.text.disabled = !on;
  ui.send.disabled = !on;
  ui.stop.disabled = !on;
}

function line(kind, who, text) {
  const li = document.createElement("li");
  li.className = kind;
  if (who) {
    const w = document.createElement("span");
    w.className = "who";
    w.textContent = who;
    li.appendChild(w);
  }
  const t = document.createElement("span");
  t.className = "text";
  t.textContent = text;
  li.appendChild(t);
  ui.transcript.appendChild(li);
  ui.transcript.scrollTop = ui.transcript.scrollHeight;
  return li;
}

// turn, input, response, heard, VAD stop, ASR, LLM 1st token, token -> audio, barge-in stop
const COLUMNS = 9;
const BARGE_IN_CELL = 8;

function latencyRow(turn) {
  let tr = latencyRows.get(turn);
  if (!tr) {
    tr = document.createElement("tr");
    for (let i = 0; i < COLUMNS; i++) tr.appendChild(document.createElement("td"));
    tr.cells[0].textContent = turn;
    ui.latency.appendChild(tr);
    latencyRows.set(turn, tr);
  }
  return tr;
}

const fmt = (v) => (v === null || v === undefined ? "–" : Math.round(v).toString());

function onMessage(ev) {
  let m;
  try { m = JSON.parse(ev.data); } catch { return; }
  messages.push(m);
  switch (m.type) {
    case "ready":
      ui.mode.textContent = `${m.mode === "llm" ? "LLM" : "say mode"} · ASR ${m.asr ? "on" : "off"} · voice ${m.voice}`;
      break;
    case "vad":
      ui.vad.textContent = m.state;
      ui.vad.className = `vad ${m.state}`;
      break;
    case "turn":
      if (m.event === "end") line("event", "", `turn ${m.turn}: you spoke ${(m.speech_ms / 1000).toFixed(1)} s`);
      break;
    case "transcript":
      line("user", "You", m.text || "(nothing recognised)");
      break;
    case "agent_text": {
      let li = agentLines.get(m.turn);
      if (!li) { li = line("agent", "Agent", ""); agentLines.set(m.turn, li); }
      li.querySelector(".text").textContent += m.delta;
      break;
    }
    case "agent_done": {
      const li = agentLines.get(m.turn);
      if (li && m.interrupted) {
        // what was played stays; the rest (never heard, and not in the history) is struck out
        li.classList.add("interrupted");
        const text = li.querySelector(".text");
        const full = text.textContent;
        if (full.trimStart().startsWith(m.text) && full.trim().length > m.text.length) {
          const cut = full.indexOf(m.text) + m.text.length;
          text.textContent = full.slice(0, cut);
          const rest = document.createElement("span");
          rest.className = "unsaid";
          rest.textContent = full.slice(cut);
          text.appendChild(rest);
        }
      }
      break;
    }
    case "latency": {
      const tr = latencyRow(m.turn);
      // heard: what the agent measured up to sending, plus what this browser adds before playing
      const heard = receiveDelayMs === null ? null : m.response_ms + receiveDelayMs;
      const cells = [m.turn, m.input, fmt(m.response_ms), fmt(heard), fmt(m.vad_stop_ms),
        fmt(m.asr_ms), fmt(m.llm_first_token_ms), fmt(m.token_to_audio_ms)];
      cells.forEach((v, i) => { tr.cells[i].textContent = v; });
      break;
    }
    case "barge_in":
      latencyRow(m.turn).cells[BARGE_IN_CELL].textContent = m.stop_ms.toFixed(1);
      break;
    case "error":
      line("error", "Error", `${m.service ? m.service + ": " : ""}${m.message}`);
      break;
  }
}

function waitForIceGathering(conn, timeoutMs) {
  if (conn.iceGatheringState === "complete") return Promise.resolve();
  return new Promise((resolve) => {
    const done = () => { conn.removeEventListener("icegatheringstatechange", check); resolve(); };
    const check = () => { if (conn.iceGatheringState === "complete") done(); };
    conn.addEventListener("icegatheringstatechange", check);
    setTimeout(done, timeoutMs);
  });
}

// This browser's receive delay for the agent's audio (getStats, polled twice a second): the
// jitter buffer's average delay per sample since the last poll, plus the playout delay where
// the browser reports it ("media-playout"). The agent sends frames all the time (silence
// between replies), so this is the delay its first reply frame meets.
async function pollReceiveDelay() {
  if (!pc) return;
  const s = { jb: 0, jbCount: 0, play: 0, playCount: 0 };
  (await pc.getStats()).forEach((r) => {
    if (r.type === "inbound-rtp" && r.kind === "audio") {
      s.jb += r.jitterBufferDelay || 0;
      s.jbCount += r.jitterBufferEmittedCount || 0;
    } else if (r.type === "media-playout") {
      s.play += r.totalPlayoutDelay || 0;
      s.playCount += r.totalSamplesCount || 0;
    }
  });
  const prev = delaySnap || { jb: 0, jbCount: 0, play: 0, playCount: 0 };
  delaySnap = s;
  if (s.jbCount <= prev.jbCount) return;
  let ms = (1000 * (s.jb - prev.jb)) / (s.jbCount - prev.jbCount);
  if (s.playCount > prev.playCount) ms += (1000 * (s.play - prev.play)) / (s.playCount - prev.playCount);
  receiveDelayMs = ms;
}

function stopLevel() {
  if (levelTimer) clearInterval(levelTimer);
  levelTimer = null;
  if (audioCtx) audioCtx.close();
  audioCtx = null;
  analyser = null;
  ui.level.value = 0; // the meter shows the agent's audio now, and there is none
}

function watchLevel(stream) {
  stopLevel();
  audioCtx = new AudioContext();
  analyser = audioCtx.createAnalyser();
  analyser.fftSize = 1024;
  audioCtx.createMediaStreamSource(stream).connect(analyser);
  const buf = new Float32Array(analyser.fftSize);
  levelTimer = setInterval(() => {
    analyser.getFloatTimeDomainData(buf);
    let peak = 0;
    for (const v of buf) peak = Math.max(peak, Math.abs(v));
    peakLevel = Math.max(peakLevel, peak);
    ui.level.value = peak;
  }, 50);
}

async function connect() {
  ui.connect.disabled = true;
  ui.conn.textContent = "connecting";
  try {
    const cfg = await (await fetch("config")).json();
    const conn = new RTCPeerConnection({ iceServers: cfg.iceServers });
    pc = conn;
    // events of an earlier call (its pc closed, or closing) change nothing of this one
    conn.addEventListener("connectionstatechange", () => {
      if (conn !== pc) return;
      ui.conn.textContent = conn.connectionState;
      if (conn.connectionState === "failed" || conn.connectionState === "closed") disconnect();
    });
    conn.addEventListener("track", (e) => {
      if (conn !== pc) return;
      const stream = e.streams[0] || new MediaStream([e.track]);
      ui.remote.srcObject = stream;
      ui.remote.muted = !ui.playback.checked;
      watchLevel(stream);
      e.track.addEventListener("ended", () => { if (conn === pc) stopLevel(); });
    });
    dc = conn.createDataChannel("chat");
    dc.addEventListener("message", onMessage);
    dc.addEventListener("close", () => { if (conn === pc) disconnect(); }); // the agent hung up
    try {
      micStream = await navigator.mediaDevices.getUserMedia({
        audio: { echoCancellation: true, noiseSuppression: true, autoGainControl: true },
      });
      const track = micStream.getAudioTracks()[0];
      track.enabled = ui.mic.checked;
      pc.addTrack(track, micStream);
    } catch (err) {
      line("error", "Microphone", `${err.name}: text only`);
      pc.addTransceiver("audio", { direction: "recvonly" });
    }
    await pc.setLocalDescription(await pc.createOffer());
    await waitForIceGathering(pc, 3000);
    const resp = await fetch("offer", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ sdp: pc.localDescription.sdp, type: pc.localDescription.type }),
    });
    const answer = await resp.json();
    if (!resp.ok) throw new Error(answer.error || resp.statusText);
    await pc.setRemoteDescription(answer);
    setConnected(true);
    delayTimer = setInterval(() => { pollReceiveDelay().catch(() => {}); }, 500);
  } catch (err) {
    line("error", "Connect", String(err.message || err));
    disconnect();
  }
}

function disconnect() {
  stopLevel();
  if (delayTimer) clearInterval(delayTimer);
  delayTimer = null;
  delaySnap = receiveDelayMs = null;
  if (dc) dc.close();
  if (pc) pc.close();
  if (micStream) micStream.getTracks().forEach((t) => t.stop());
  pc = dc = micStream = null;
  ui.remote.srcObject = null;
  ui.conn.textContent = "idle";
  ui.vad.textContent = "quiet";
  ui.vad.className = "vad quiet";
  setConnected(false);
}

function sendText(text) {
  if (!dc || dc.readyState !== "open" || !text) return false;
  dc.send(JSON.stringify({ type: "text", text }));
  return true;
}

ui.connect.addEventListener("click", connect);
ui.disconnect.addEventListener("click", disconnect);
ui.mic.addEventListener("change", () => {
  if (micStream) micStream.getAudioTracks().forEach((t) => { t.enabled = ui.mic.checked; });
});
ui.playback.addEventListener("change", () => { ui.remote.muted = !ui.playback.checked; });
ui.form.addEventListener("submit", (e) => {
  e.preventDefault();
  if (sendText(ui.text.value.trim())) ui.text.value = "";
});
ui.stop.addEventListener("click", () => {
  if (dc && dc.readyState === "open") dc.send(JSON.stringify({ type: "interrupt" }));
});

// For tests and debugging: the call's state and received-audio statistics.
window.agent = {
  messages,
  get connectionState() { return pc ? pc.connectionState : "idle"; },
  get dataChannelState() { return dc ? dc.readyState : "none"; },
  get receiveDelayMs() { return receiveDelayMs; },
  sendText,
  resetPeak() { peakLevel = 0; },
  async audioStats() {
    const out = { packetsReceived: 0, totalSamplesReceived: 0, totalAudioEnergy: 0, peakLevel };
    if (!pc) return out;
    (await pc.getStats()).forEach((r) => {
      if (r.type === "inbound-rtp" && r.kind === "audio") {
        out.packetsReceived += r.packetsReceived || 0;
        out.totalSamplesReceived += r.totalSamplesReceived || 0;
        out.totalAudioEnergy += r.totalAudioEnergy || 0;
      }
    });
    return out;
  },
};
