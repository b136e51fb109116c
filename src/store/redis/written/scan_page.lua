-- One page of the written keys' scan (SCAN_PAGE_SCRIPT in written/scan.rs says how): the
-- entries a SCAN from cursor ARGV[1] finds under pattern ARGV[2] (ARGV[3] a page),
-- each as the 16 hex digits from position ARGV[4] of its name and its PTTL. An entry
-- gone between the SCAN and its PTTL (-2) is left out.
local page = redis.call('SCAN', ARGV[1], 'MATCH', ARGV[2], 'COUNT', ARGV[3])
local out = {page[1]}
local from = tonumber(ARGV[4])
for _, name in ipairs(page[2]) do
  local ttl = redis.call('PTTL', name)
  if ttl ~= -2 then
    out[#out + 1] = string.sub(name, from, from + 15)
    out[#out + 1] = ttl
  end
end
return out
