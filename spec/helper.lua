-- Loaded by busted before the specs: picks the build under test
-- (HERALD_BUILD=dev|asan, default dev) so specs load this checkout's module.
local build = os.getenv("HERALD_BUILD") or "dev"
package.path = "lua/?.lua;lua/?/init.lua;" .. package.path
package.cpath = "build/" .. build .. "/?.so;" .. package.cpath
