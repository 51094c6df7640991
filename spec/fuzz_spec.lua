-- The fuzz targets (fuzz/, `make fuzz`) run once over every regression input
-- (what fuzzing once found) and every seed, built with ASan and UBSan: a
-- crash, leak, sanitizer report or harness invariant fails. The timed
-- fuzzing itself is `make fuzz` (FUZZ_SECONDS each), not run here: its
-- findings are not the same from one run to the next.
-- The targets carry their own sanitizers: run once, in the dev flavor.
if (os.getenv("HERALD_BUILD") or "dev") == "asan" then return end

describe("fuzz targets", function()
  it("pass every regression and seed input (make fuzz-regressions)", function()
    local p = assert(io.popen("timeout 600 make -s fuzz-regressions 2>&1"))
    local out = p:read("a")
    local ok = p:close()
    assert(ok, "make fuzz-regressions failed:\n" .. out:sub(-4000))
    assert.matches("== fuzz: no failure", out, 1, true)
    for _, target in ipairs { "http", "ws", "resume", "tls" } do
      assert.matches("== fuzz " .. target .. ":", out, 1, true)
    end
  end)
end)
