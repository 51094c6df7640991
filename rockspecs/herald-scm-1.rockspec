rockspec_format = "3.0"
package = "herald"
version = "scm-1"
source = {
  url = "git+file:///dev/null", -- built from a checkout with `luarocks make`
}
description = {
  summary = "Real-time push for Lua: WebSocket and Server-Sent Events servers in a few lines",
  detailed = [[
herald is a Lua 5.4 module written in C (libuv, llhttp) that turns a Lua script
into an HTTP and real-time push server holding many connections on one core.
]],
  license = "MIT",
}
dependencies = {
  "lua >= 5.4",
}
external_dependencies = {
  LIBUV = { header = "uv.h", library = "uv" },
}
build = {
  type = "make",
  build_target = "release",
  build_variables = {
    CC = "$(CC)",
    LUA_INC = "-I$(LUA_INCDIR)",
    UV_INC = "-I$(LIBUV_INCDIR)",
    UV_LIBS = "-L$(LIBUV_LIBDIR) -luv",
  },
  install_target = "install",
  install_variables = {
    INST_LIBDIR = "$(LIBDIR)",
    INST_LUADIR = "$(LUADIR)",
  },
}
