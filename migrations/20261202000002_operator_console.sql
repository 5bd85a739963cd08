-- The operator console (issue 16): a `cancelled` state, replays, console tokens, and the indexes
-- that keep the console's per-subscription figures and delivery lists bounded.

-- An operator can cancel pending deliveries (a dead endpoint's backlog). `cancelled` is final, like
-- `failed`: it has a `finished_at` (retention prunes it) and an operator can replay it. NOT VALID
-- then VALIDATE, so that existing rows are checked without blocking writers.
ALTER TABLE fhir_outbox.delivery DROP CONSTRAINT delivery_state_check;
ALTER TABLE fhir_outbox.delivery ADD CONSTRAINT delivery_state_check
    CHECK (state IN ('pending', 'in_flight', 'succeeded', 'skipped', 'failed', 'cancelled')) NOT VALID;
ALTER TABLE fhir_outbox.delivery VALIDATE CONSTRAINT delivery_state_check;

-- A replay sends the delivery's own version again, with its `webhook-id`, even when the resource
-- has moved on or been deleted since: the preamble's staleness checks do not apply to it.
ALTER TABLE fhir_outbox.delivery ADD COLUMN replay boolean NOT NULL DEFAULT false;

-- The status view counts cancelled deliveries too (a new column at the end; the others are
-- unchanged).
CREATE OR REPLACE VIEW fhir_outbox.subscription_delivery_status AS
SELECT r.project_id,
       r.id                                           AS subscription_id,
       v.content ->> 'status'                         AS status,
       v.content -> 'channel' ->> 'type'              AS channel_type,
       v.content ->> 'criteria'                       AS criteria,
       (p.subscription_id IS NOT NULL)                AS paused,
       coalesce(d.pending, 0)                         AS pending,
       coalesce(d.in_flight, 0)                       AS in_flight,
       coalesce(d.succeeded, 0)                       AS succeeded,
       coalesce(d.skipped, 0)                         AS skipped,
       coalesce(d.failed, 0)                          AS failed,
       d.oldest_undelivered_at,
       now() - d.oldest_undelivered_at                AS oldest_undelivered_age,
       d.last_error,
       d.last_skip_reason,
       d.last_finished_at,
       coalesce(i.issues, 0)                          AS issues,
       i.suspended_reason,
       coalesce(d.cancelled, 0)                       AS cancelled
FROM fhir_outbox.resource r
JOIN fhir_outbox.resource_version v USING (project_id, resource_type, id, version_id)
LEFT JOIN fhir_outbox.subscription_pause p ON p.project_id = r.project_id AND p.subscription_id = r.id
LEFT JOIN LATERAL (
    SELECT count(*) FILTER (WHERE x.state = 'pending')   AS pending,
           count(*) FILTER (WHERE x.state = 'in_flight') AS in_flight,
           count(*) FILTER (WHERE x.state = 'succeeded') AS succeeded,
           count(*) FILTER (WHERE x.state = 'skipped')   AS skipped,
           count(*) FILTER (WHERE x.state = 'failed')    AS failed,
           count(*) FILTER (WHERE x.state = 'cancelled') AS cancelled,
           min(x.changed_at) FILTER (WHERE x.state IN ('pending', 'in_flight')) AS oldest_undelivered_at,
           (array_agg(x.reason ORDER BY x.id DESC)
                FILTER (WHERE x.state IN ('failed', 'pending') AND x.reason IS NOT NULL))[1] AS last_error,
           (array_agg(x.reason ORDER BY x.id DESC) FILTER (WHERE x.state = 'skipped'))[1] AS last_skip_reason,
           max(x.finished_at) AS last_finished_at
    FROM fhir_outbox.delivery x
    WHERE x.project_id = r.project_id AND x.subscription_id = r.id
) d ON true
LEFT JOIN LATERAL (
    SELECT count(*) AS issues,
           min(s.message) FILTER (WHERE s.kind = 'budget_exhausted') AS suspended_reason
    FROM fhir_outbox.subscription_issue s
    WHERE s.project_id = r.project_id AND s.subscription_id = r.id AND s.subscription_version = r.version_id
) i ON true
WHERE r.resource_type = 'Subscription' AND NOT r.deleted;

-- Bearer tokens of the console and its API. Only a SHA-256 of the secret is stored: the secret is
-- shown once, when the token is created. A token with a project sees and acts on that project
-- only; a viewer cannot act.
CREATE TABLE fhir_outbox.console_token (
    id            uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    name          text NOT NULL CHECK (name <> '' AND length(name) <= 100),
    role          text NOT NULL CHECK (role IN ('viewer', 'operator')),
    project_id    uuid REFERENCES fhir_outbox.project (id),
    secret_sha256 bytea NOT NULL UNIQUE,
    created_at    timestamptz NOT NULL DEFAULT now(),
    revoked_at    timestamptz,
    last_used_at  timestamptz
);

-- The console's figures per subscription (success rate, p50/p99 attempt duration over 1 h and
-- 24 h) read the latest attempts of one subscription: an index-only scan of this index.
CREATE INDEX delivery_attempt_by_subscription
    ON fhir_outbox.delivery_attempt (project_id, subscription_id, started_at)
    INCLUDE (succeeded, duration_ms);

-- Deliveries and failures per minute over the last hour (the overview's chart).
CREATE INDEX delivery_attempt_recent
    ON fhir_outbox.delivery_attempt (started_at)
    INCLUDE (project_id, succeeded, duration_ms);

-- The deliveries of one resource, newest first (the console's resource filter).
CREATE INDEX delivery_by_resource
    ON fhir_outbox.delivery (project_id, resource_type, resource_id, id);

-- The console's filter on a given-up state (failed, skipped, cancelled: rare, and often old) of a
-- project, newest first. Without it the list walked the primary key back through every newer
-- delivery (60 ms at 600,000 deliveries for `cancelled`, more the rarer the state). Partial, so
-- that only deliveries that give up are written to it: the pipeline's hot path (pending, in
-- flight, succeeded) never is.
CREATE INDEX delivery_given_up
    ON fhir_outbox.delivery (project_id, id)
    WHERE state IN ('failed', 'skipped', 'cancelled');

-- endpoint_health as in 20261202000001, but the load of each endpoint counted per subscription
-- from the partial indexes of pending (delivery_queue) and in-flight (delivery_leased) deliveries,
-- then joined to the subscriptions' endpoints: `state IN ('pending', 'in_flight')` matched neither
-- index, so every delivery of every subscription was read (240 ms for one project's endpoints at
-- 600,000 deliveries, 1.3 s for all), and the join computed each delivery's endpoint.
CREATE OR REPLACE VIEW fhir_outbox.endpoint_health AS
WITH endpoints AS (
    SELECT DISTINCT project_id, endpoint FROM fhir_outbox.subscription_endpoint
    WHERE endpoint IS NOT NULL
    UNION
    SELECT project_id, endpoint FROM fhir_outbox.endpoint_circuit
),
load AS (
    SELECT e.project_id, e.endpoint,
           sum(d.in_flight)::bigint AS in_flight,
           sum(d.pending)::bigint AS pending,
           count(*) AS subscriptions_waiting
    FROM (SELECT project_id, subscription_id,
                 count(*) FILTER (WHERE state = 'in_flight') AS in_flight,
                 count(*) FILTER (WHERE state = 'pending') AS pending
          FROM (SELECT project_id, subscription_id, 'pending' AS state FROM fhir_outbox.delivery
                WHERE state = 'pending'
                UNION ALL
                SELECT project_id, subscription_id, 'in_flight' FROM fhir_outbox.delivery
                WHERE state = 'in_flight') x
          GROUP BY project_id, subscription_id) d
    JOIN fhir_outbox.subscription_endpoint e USING (project_id, subscription_id)
    GROUP BY e.project_id, e.endpoint
)
SELECT e.project_id, e.endpoint,
       coalesce(c.state, 'closed') AS state,
       coalesce(c.consecutive_failures, 0) AS consecutive_failures,
       coalesce(c.openings, 0) AS openings,
       c.opened_at, c.next_probe_at, c.last_failure, c.last_failure_at, c.last_success_at,
       coalesce(l.in_flight, 0) AS in_flight,
       coalesce(l.pending, 0) AS pending
FROM endpoints e
LEFT JOIN fhir_outbox.endpoint_circuit c USING (project_id, endpoint)
LEFT JOIN load l USING (project_id, endpoint);
