//! The statements the PostgreSQL store runs (prepared and cached per connection).

/// Take the id if it is free, expired, or already ours (renewal).
pub(super) const CLAIM: &str = "\
INSERT INTO cottontail_dedup AS d (scope, id, state, owner, reply, has_reply, expires_at)
VALUES ($1, $2, 'claimed', $3, NULL, false, now() + $4::float8 * interval '1 millisecond')
ON CONFLICT (scope, id) DO UPDATE
   SET state = 'claimed', owner = EXCLUDED.owner, reply = NULL, has_reply = false,
       expires_at = EXCLUDED.expires_at
 WHERE d.expires_at <= now() OR (d.state = 'claimed' AND d.owner = EXCLUDED.owner)
RETURNING true";

/// What holds an id, if anything unexpired does.
pub(super) const PEEK: &str = "\
SELECT state, reply, has_reply FROM cottontail_dedup
 WHERE scope = $1 AND id = $2 AND expires_at > now()";

/// Record success, unless a success is already recorded (the first reply stays, so every
/// duplicate gets the same one). Written even if another owner claimed the id since.
pub(super) const COMPLETE: &str = "\
INSERT INTO cottontail_dedup AS d (scope, id, state, owner, reply, has_reply, expires_at)
VALUES ($1, $2, 'done', NULL, $3, $4, now() + $5::float8 * interval '1 millisecond')
ON CONFLICT (scope, id) DO UPDATE
   SET state = 'done', owner = NULL, reply = EXCLUDED.reply, has_reply = EXCLUDED.has_reply,
       expires_at = EXCLUDED.expires_at
 WHERE d.state <> 'done' OR d.expires_at <= now()";

pub(super) const RELEASE: &str = "\
DELETE FROM cottontail_dedup WHERE scope = $1 AND id = $2 AND state = 'claimed' AND owner = $3";

/// Inside `begin_once`'s transaction: the done row, visible to others only at commit.
pub(super) const ONCE: &str = "\
INSERT INTO cottontail_dedup AS d (scope, id, state, owner, reply, has_reply, expires_at)
VALUES ($1, $2, 'done', NULL, NULL, false, now() + $3::float8 * interval '1 millisecond')
ON CONFLICT (scope, id) DO UPDATE
   SET state = 'done', owner = NULL, reply = NULL, has_reply = false,
       expires_at = EXCLUDED.expires_at
 WHERE d.expires_at <= now()
RETURNING true";

pub(super) const ONCE_REPLY: &str = "\
UPDATE cottontail_dedup SET reply = $3, has_reply = $4
 WHERE scope = $1 AND id = $2 AND state = 'done'";

pub(super) const JOB_GET: &str = "\
SELECT status::text FROM cottontail_jobs WHERE message_id = $1 AND expires_at > now()";

pub(super) const JOB_PUT: &str = "\
INSERT INTO cottontail_jobs (message_id, status, expires_at)
VALUES ($1, $2::text::jsonb, now() + $3::float8 * interval '1 millisecond')
ON CONFLICT (message_id) DO UPDATE SET status = EXCLUDED.status, expires_at = EXCLUDED.expires_at";

/// A batch of job statuses in one statement, each keeping the `created_at` of the unexpired
/// status it replaces. The ids of one batch are distinct (an upsert cannot touch a row twice).
pub(super) const JOB_PUT_MANY: &str = "\
INSERT INTO cottontail_jobs AS j (message_id, status, expires_at)
SELECT id, doc::jsonb, now() + $3::float8 * interval '1 millisecond'
  FROM unnest($1::text[], $2::text[]) AS t(id, doc)
ON CONFLICT (message_id) DO UPDATE
   SET status = CASE WHEN j.expires_at > now() AND j.status ? 'created_at'
                     THEN jsonb_set(EXCLUDED.status, '{created_at}', j.status -> 'created_at')
                     ELSE EXCLUDED.status END,
       expires_at = EXCLUDED.expires_at";

pub(super) const SEQ_NEXT: &str = "\
SELECT next FROM cottontail_sequences WHERE scope = $1 AND key = $2";

/// Compare-and-set from 1: a missing row is 1, so the insert and the update of a row still at
/// 1 are one atomic statement (two instances racing on a new key cannot both win).
pub(super) const SEQ_ADVANCE_FROM_ONE: &str = "\
INSERT INTO cottontail_sequences AS s (scope, key, next) VALUES ($1, $2, $3)
ON CONFLICT (scope, key) DO UPDATE SET next = EXCLUDED.next WHERE s.next = 1
RETURNING true";

/// Compare-and-set from anything else: a missing row (1) cannot match.
pub(super) const SEQ_ADVANCE: &str = "\
UPDATE cottontail_sequences SET next = $4 WHERE scope = $1 AND key = $2 AND next = $3";

pub(super) const STAMP: &str = "\
INSERT INTO cottontail_stamps (key, last) VALUES ($1, 1)
ON CONFLICT (key) DO UPDATE SET last = cottontail_stamps.last + 1
RETURNING last";

pub(super) const CHECKPOINT_LOAD: &str = "\
SELECT state FROM cottontail_checkpoints WHERE scope = $1 AND id = $2 AND expires_at > now()";

pub(super) const CHECKPOINT_SAVE: &str = "\
INSERT INTO cottontail_checkpoints (scope, id, state, expires_at)
VALUES ($1, $2, $3, now() + $4::float8 * interval '1 millisecond')
ON CONFLICT (scope, id) DO UPDATE SET state = EXCLUDED.state, expires_at = EXCLUDED.expires_at";

pub(super) const CHECKPOINT_REMOVE: &str = "\
DELETE FROM cottontail_checkpoints WHERE scope = $1 AND id = $2";

pub(super) const PURGE: &str = "\
DELETE FROM cottontail_dedup WHERE ctid = ANY(ARRAY(
    SELECT ctid FROM cottontail_dedup WHERE expires_at <= now() LIMIT 10000));
DELETE FROM cottontail_jobs WHERE ctid = ANY(ARRAY(
    SELECT ctid FROM cottontail_jobs WHERE expires_at <= now() LIMIT 10000));
DELETE FROM cottontail_joins WHERE ctid = ANY(ARRAY(
    SELECT ctid FROM cottontail_joins WHERE expires_at <= now() LIMIT 10000));
DELETE FROM cottontail_checkpoints WHERE ctid = ANY(ARRAY(
    SELECT ctid FROM cottontail_checkpoints WHERE expires_at <= now() LIMIT 10000));";

/// Record a join's field unless it is recorded (values hex-encoded in a `jsonb` object) and
/// return the field count. The upsert locks the row, so concurrent records of one join see
/// each other's fields: exactly one of them returns the full count. An expired join starts
/// over.
pub(super) const JOIN_RECORD: &str = "\
INSERT INTO cottontail_joins AS j (scope, id, fields, expires_at)
VALUES ($1, $2, jsonb_build_object($3::text, encode($4::bytea, 'hex')),
        now() + $5::float8 * interval '1 millisecond')
ON CONFLICT (scope, id) DO UPDATE
   SET fields = CASE WHEN j.expires_at <= now() THEN EXCLUDED.fields
                     WHEN j.fields ? $3::text THEN j.fields
                     ELSE j.fields || EXCLUDED.fields END,
       expires_at = EXCLUDED.expires_at
RETURNING (SELECT count(*) FROM jsonb_object_keys(j.fields))";

pub(super) const JOIN_FIELDS: &str = "\
SELECT f.key, f.value FROM cottontail_joins, jsonb_each_text(fields) AS f
 WHERE scope = $1 AND id = $2 AND expires_at > now()";

/// Expired rows are overwritten in place by the next claim of the same id; ids that never come
/// back are deleted by a bounded purge every this many writes.
pub(super) const PURGE_EVERY: u64 = 1000;

/// Keep a supervision watch (replacing the one held under the id).
pub(super) const WATCH: &str = "\
INSERT INTO cottontail_watches (scope, id, due_ms, value) VALUES ($1, $2, $3, $4)
ON CONFLICT (scope, id) DO UPDATE SET due_ms = EXCLUDED.due_ms, value = EXCLUDED.value";

pub(super) const UNWATCH: &str = "DELETE FROM cottontail_watches WHERE scope = $1 AND id = $2";

/// The watches due, earliest first (the index on `(scope, due_ms)` serves it).
pub(super) const DUE: &str = "\
SELECT id, value FROM cottontail_watches WHERE scope = $1 AND due_ms <= $2
 ORDER BY due_ms LIMIT $3";
