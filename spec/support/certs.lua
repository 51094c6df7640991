--- Certificates for TLS specs, made with the openssl CLI (EC P-256, names in
-- subjectAltName, as spec/tls_spec.lua makes its own) in a temporary folder.
local proc = require "spec.support.process"

local quote = proc.quote
local certs = {}

local function openssl(args)
  local p = assert(io.popen(proc.unsanitized .. "openssl " .. args .. " 2>&1"))
  local out = p:read("a")
  if p:close() ~= true then error("openssl " .. args .. " failed:\n" .. out, 3) end
end

--- A new private folder (0700); certs.remove(dir) deletes it.
function certs.dir()
  local dir = os.tmpname() -- a unique name: made into a folder
  os.remove(dir)
  assert(os.execute("mkdir -m 700 " .. quote(dir)))
  return dir
end

function certs.remove(dir)
  if dir then os.execute("rm -rf " .. quote(dir)) end
end

local function paths(dir, name)
  return { cert = ("%s/%s.pem"):format(dir, name), key = ("%s/%s.key"):format(dir, name) }
end

--- A self-signed CA: { cert, key } in dir.
function certs.ca(dir, name)
  local ca = paths(dir, name)
  openssl(("req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 -subj %s " ..
    "-addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign " ..
    "-keyout %s -out %s"):format(quote("/CN=" .. name), quote(ca.key), quote(ca.cert)))
  return ca
end

--- A certificate that ca signs for names (host names, and IPv4 addresses as
-- IP entries), usable by a server or a client: { cert, key } in dir.
function certs.issue(dir, ca, name, names)
  local c = paths(dir, name)
  local san = {}
  for i, n in ipairs(names) do san[i] = (n:match("^[%d.]+$") and "IP:" or "DNS:") .. n end
  local csr, ext = ("%s/%s.csr"):format(dir, name), ("%s/%s.ext"):format(dir, name)
  openssl(("req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -subj %s -keyout %s -out %s")
    :format(quote("/CN=" .. names[1]), quote(c.key), quote(csr)))
  local f = assert(io.open(ext, "w"))
  f:write("subjectAltName=", table.concat(san, ","), "\n")
  f:close()
  openssl(("x509 -req -in %s -CA %s -CAkey %s -CAcreateserial -days 2 -extfile %s -out %s")
    :format(quote(csr), quote(ca.cert), quote(ca.key), quote(ext), quote(c.cert)))
  return c
end

return certs
