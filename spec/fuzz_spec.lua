-- The fuzz targets (fuzz/, `make fuzz`), built with ASan and UBSan:
-- 1. once over every regression input (what fuzzing once found) and every
--    seed: a crash, leak, sanitizer report or harness invariant fails;
-- 2. then each target fuzzed for HERALD_FUZZ_SECONDS (default 45) from the
--    seeds (and what earlier runs on this machine found, in build/fuzz/):
--    CI's timed fuzzing. What it finds differs from run to run; a failure
--    names the input and how to keep it in fuzz/regressions/<target>/
--    (scripts/fuzz prints it, and the failure message carries it).
--    HERALD_FUZZ_SECONDS=0 leaves the timed runs out (reported pending).
-- The targets carry their own sanitizers: run once, in the dev flavor.
if (os.getenv("HERALD_BUILD") or "dev") == "asan" then return end

local TARGETS = { "http", "ws", "resume", "tls" }
local SECONDS = tonumber(os.getenv("HERALD_FUZZ_SECONDS") or "45")

local function make(args, limit)
  local p = assert(io.popen(("timeout %d make -s %s 2>&1"):format(limit, args)))
  local out = p:read("a")
  local ok = p:close()
  return ok, out
end

describe("fuzz targets", function()
  it("pass every regression and seed input (make fuzz-regressions)", function()
    local ok, out = make("fuzz-regressions", 600)
    assert(ok, "make fuzz-regressions failed:\n" .. out:sub(-4000))
    assert.matches("== fuzz: no failure", out, 1, true)
    for _, target in ipairs(TARGETS) do
      assert.matches("== fuzz " .. target .. ":", out, 1, true)
    end
  end)

  for _, target in ipairs(TARGETS) do
    it(("fuzz %s for HERALD_FUZZ_SECONDS (%d s) without a failure"):format(target, SECONDS), function()
      if SECONDS <= 0 then pending("HERALD_FUZZ_SECONDS=0: no timed fuzzing") end
      local ok, out = make(("fuzz FUZZ_TARGETS=%s FUZZ_SECONDS=%d"):format(target, SECONDS), SECONDS + 300)
      -- the summary line of a timed run: coverage, corpus, speed
      local summary = out:match("\n   (" .. target .. ": cov: [^\n]*)")
      io.stderr:write(("fuzz %s, %d s: %s\n"):format(target, SECONDS, summary or "no summary"))
      assert(ok, ("make fuzz FUZZ_TARGETS=%s failed:\n%s"):format(target, out:sub(-4000)))
      assert.matches("== fuzz " .. target .. ": " .. SECONDS .. "s from", out, 1, true)
      assert.matches("== fuzz: no failure", out, 1, true)
    end)
  end
end)
