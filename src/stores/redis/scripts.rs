//! The Lua scripts that make each Redis store operation one atomic round trip.

use std::sync::LazyLock;

use ::redis::Script;

/// Claim: take a free (or expired) id, renew our own claim, otherwise report what holds it.
/// KEYS[1] = key; ARGV[1] = `claim:<owner>`; ARGV[2] = lease in ms.
pub(super) static CLAIM: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local v = redis.call('GET', KEYS[1])
if (not v) or v == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return {'acquired'}
end
local tag = string.sub(v, 1, 6)
if tag == 'done1:' then return {'done', string.sub(v, 7)} end
if tag == 'done0:' then return {'done'} end
if string.sub(v, 1, 6) == 'claim:' then return {'busy'} end
return {'corrupt'}
",
    )
});

/// Complete: record success unless a success is already recorded (the first reply stays, so
/// every duplicate gets the same one). Written even if another owner claimed the id since.
/// KEYS[1] = key; ARGV[1] = `done0:` | `done1:<reply>`; ARGV[2] = retention in ms.
pub(super) static COMPLETE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local v = redis.call('GET', KEYS[1])
if v and string.sub(v, 1, 4) == 'done' then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
",
    )
});

/// Release: delete the key only if it is still this owner's claim.
/// KEYS[1] = key; ARGV[1] = `claim:<owner>`.
pub(super) static RELEASE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
",
    )
});

/// Job statuses, a batch in one call: each key gets its new status document, keeping the
/// `created_at` of the one it replaces. The documents are serde's (field order fixed, the
/// top-level `created_at` a number after three string fields and one number, none of which
/// can contain an unescaped quote), so the first `"created_at":` is the top-level one.
/// KEYS = job keys; ARGV[1] = retention in ms; ARGV[1 + i] = the status of KEYS[i].
pub(super) static JOB_PUT_MANY: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
for i, key in ipairs(KEYS) do
  local doc = ARGV[i + 1]
  local old = redis.call('GET', key)
  if old then
    local first = string.match(old, '"created_at":(%-?[%d%.eE%+%-]+)')
    if first then
      doc = string.gsub(doc, '"created_at":%-?[%d%.eE%+%-]+',
        function() return '"created_at":' .. first end, 1)
    end
  end
  redis.call('SET', key, doc, 'PX', ARGV[1])
end
return #KEYS
"#,
    )
});

/// Sequence compare-and-set: move the next expected number from ARGV[1] to ARGV[2] if it is
/// ARGV[1] now (a missing key is 1). Compared as decimal strings, so numbers past 2^53 (Lua's
/// exact range) stay exact. KEYS[1] = key.
pub(super) static ADVANCE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local v = redis.call('GET', KEYS[1])
if not v then v = '1' end
if v ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2])
return 1
",
    )
});

/// Join record: set the field unless it is set (the first value stays), renew the expiry,
/// return the number of fields — one atomic step, so exactly one caller completes a join.
/// KEYS[1] = join key; ARGV[1] = field; ARGV[2] = value; ARGV[3] = retention in ms.
pub(super) static JOIN_RECORD: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return redis.call('HLEN', KEYS[1])
",
    )
});
