-- The guarded write of a run of entries (GUARDED_WRITE in writes.rs says how).
local function mark(key)
  local value = redis.pcall('GET', key)
  if type(value) == 'string' then return tonumber(value) or 0 end
  return 0
end
local purged = mark(KEYS[1])
local codes = {}
-- Each index to add keys to: the keys written, and the longest time to live among
-- them (as text: Lua prints a large number in exponent form, which PEXPIRE refuses).
local indexed = {}
-- What was written, announced on the channel ARGV[2] (none when it is empty): the
-- first 16 hex digits of each key, and its time to live.
local announced = {}
local k = 2
for a = 3, #ARGV - 3, 4 do
  local tags = tonumber(ARGV[a])
  local millis = ARGV[a + 1]
  local started = tonumber(ARGV[a + 2])
  local value = ARGV[a + 3]
  local target, staging = KEYS[k], nil
  if value == '' then
    staging = KEYS[k + 1]
    k = k + 2
  else
    k = k + 1
  end
  local code = 1
  if purged >= started then code = 0 end
  for i = k, k + tags do
    if code == 1 and mark(KEYS[i]) >= started then code = 0 end
  end
  if code == 1 and staging and redis.call('EXISTS', staging) == 0 then code = 3 end
  if code == 1 and ARGV[1] == '1' and redis.call('EXISTS', target) == 1 then code = 2 end
  if code == 1 then
    if staging then
      redis.call('RENAME', staging, target)
      redis.call('PEXPIRE', target, millis)
    else
      redis.call('SET', target, value, 'PX', millis)
    end
    announced[#announced + 1] = string.sub(target, -64, -49) .. ':' .. millis
    for i = k + tags + 1, k + 2 * tags do
      local index = indexed[KEYS[i]]
      if not index then
        index = {keys = {}, millis = millis}
        indexed[KEYS[i]] = index
      elseif tonumber(index.millis) < tonumber(millis) then
        index.millis = millis
      end
      index.keys[#index.keys + 1] = target
    end
  elseif staging and code ~= 3 then
    redis.call('DEL', staging)
  end
  codes[#codes + 1] = code
  k = k + 1 + 2 * tags
end
for name, index in pairs(indexed) do
  redis.pcall('SADD', name, unpack(index.keys))
  redis.pcall('PEXPIRE', name, index.millis, 'NX')
  redis.pcall('PEXPIRE', name, index.millis, 'GT')
end
-- pcall: a user not allowed to publish still writes (other replicas then read).
if ARGV[2] ~= '' and #announced > 0 then
  redis.pcall('PUBLISH', ARGV[2], table.concat(announced, ' '))
end
return codes