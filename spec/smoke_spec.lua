local herald = require "herald"
local t = require "herald.test"
describe("smoke", function()
  it("answers", function()
    local app = herald.new()
    app:get("/", function(_, res) res:send("ok") end)
    assert.equal("ok", t.get(app, "/").body)
    app:close()
  end)
end)
