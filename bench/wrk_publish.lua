-- wrk script of the publish-API scenario: POST a small JSON message to
-- /v1/channels/bench-<n>/messages at a fixed rate.
--
-- wrk (Debian's; wrk2 is not packaged) is closed-loop: each connection sends its next request
-- when the previous answer is in. `delay()` turns it into a paced one: every request claims the
-- next slot of a schedule of `rate` slots a second and waits for it, so with enough connections
-- (more than rate x latency) the offered load is the rate, not whatever the server sustains.
-- Usage: wrk -t1 -c16 -d15s -s wrk_publish.lua http://127.0.0.1:PORT -- <rate> <channels>

local ffi = require("ffi")
ffi.cdef [[
typedef struct { long tv_sec; long tv_nsec; } bench_timespec;
int clock_gettime(int clock_id, bench_timespec *tp);
]]
local clock = ffi.new("bench_timespec")
local CLOCK_MONOTONIC = 1

local function now_ms()
  ffi.C.clock_gettime(CLOCK_MONOTONIC, clock)
  return tonumber(clock.tv_sec) * 1000 + tonumber(clock.tv_nsec) / 1e6
end

local interval_ms = 10
local channels = 8
local slot = 0
local start_ms = nil
local counter = 0

function init(args)
  interval_ms = 1000 / tonumber(args[1])
  channels = tonumber(args[2]) or 8
end

function delay()
  local now = now_ms()
  if start_ms == nil then
    start_ms = now
  end
  local at = start_ms + slot * interval_ms
  slot = slot + 1
  if at <= now then
    return 0
  end
  return math.floor(at - now + 0.5)
end

function request()
  counter = counter + 1
  local body = '{"data":{"seq":' .. counter .. ',"text":"the quick brown fox jumps over the lazy dog"}}'
  return wrk.format("POST", "/v1/channels/bench-" .. (counter % channels) .. "/messages",
    { ["Content-Type"] = "application/json" }, body)
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"requests":%d,"duration_us":%d,"connect_errors":%d,"read_errors":%d,' ..
    '"write_errors":%d,"status_errors":%d,"timeouts":%d,"p50_us":%d,"p90_us":%d,' ..
    '"p99_us":%d,"max_us":%d,"mean_us":%.1f}\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max,
    latency.mean))
end
