-- Endpoint isolation: deliveries are claimed fairly across projects and subscriptions, at most a
-- configured number are in flight per endpoint, and an endpoint that keeps failing has its circuit
-- opened so that its deliveries wait in this table instead of holding request slots.
--
-- An endpoint is a project's (scheme, host, port): keyed per project, so that no tenant can open
-- another tenant's circuit or use up its in-flight allowance by pointing a subscription at the
-- same host.

-- The endpoint of a subscription's `channel.endpoint`: `scheme://host:port`, lower case, without
-- credentials, path or query; the default port made explicit. A `Bot/<id>` endpoint is itself;
-- anything else unparsable is `unparsed:` and its MD5 (it may hold a secret; it is logged).
CREATE FUNCTION fhir_outbox.endpoint_origin(endpoint text) RETURNS text
    LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE
-- PL/pgSQL rather than SQL: every claim calls it once per busy subscription, and a SQL function
-- with a FROM clause cannot be inlined, so it would be run as a query of its own each time.
AS $$
DECLARE
    m text[];
BEGIN
    IF endpoint IS NULL THEN
        RETURN NULL;
    END IF;
    m := regexp_match(endpoint,
        '^([A-Za-z][A-Za-z0-9+.-]*)://(?:[^@/?#]*@)?(\[[^]/?#]*\]|[^:/?#]*)(?::([0-9]*))?');
    IF m IS NULL THEN
        RETURN CASE WHEN endpoint LIKE 'Bot/%' THEN endpoint ELSE 'unparsed:' || md5(endpoint) END;
    END IF;
    RETURN lower(m[1]) || '://' || lower(m[2]) || ':' ||
           coalesce(nullif(m[3], ''),
                    CASE lower(m[1]) WHEN 'https' THEN '443' WHEN 'http' THEN '80' ELSE '' END);
END
$$;

-- The endpoint every current subscription delivers to (NULL for a subscription without one).
CREATE VIEW fhir_outbox.subscription_endpoint AS
SELECT r.project_id, r.id AS subscription_id,
       fhir_outbox.endpoint_origin(v.content #>> '{channel,endpoint}') AS endpoint
FROM fhir_outbox.resource r
JOIN fhir_outbox.resource_version v USING (project_id, resource_type, id, version_id)
WHERE r.resource_type = 'Subscription' AND NOT r.deleted;

-- The claim visits each (project, subscription) that has pending deliveries with a skip scan of
-- this index, and takes the first due ones of each in order. (The in-flight load it counts comes
-- from `delivery_leased`: in-flight rows are few, at most every worker's request slots.)
CREATE INDEX delivery_queue
    ON fhir_outbox.delivery (project_id, subscription_id, next_attempt_at, id)
    WHERE state = 'pending';

-- Where the previous claim stopped in its round of the subscriptions with pending deliveries: the
-- next claim goes on from there, so each claim visits a bounded number of them and every one gets
-- its turn. One row; unlogged, since losing it in a crash only restarts the round.
CREATE UNLOGGED TABLE fhir_outbox.claim_cursor (
    only_row boolean PRIMARY KEY DEFAULT true CHECK (only_row),
    project_id uuid NOT NULL,
    subscription_id text NOT NULL
);
INSERT INTO fhir_outbox.claim_cursor (project_id, subscription_id)
VALUES ('00000000-0000-0000-0000-000000000000', '');

-- The circuit breaker of each endpoint that has failed. No row: closed, with no failure since its
-- last success. `open`: its deliveries wait until `next_probe_at`, when one probe is claimed and the
-- circuit is `half_open` until the probe's outcome is recorded (or, if its worker dies, until
-- `next_probe_at` again, then another probe goes).
CREATE TABLE fhir_outbox.endpoint_circuit (
    project_id uuid NOT NULL,
    endpoint text NOT NULL,
    state text NOT NULL DEFAULT 'closed' CHECK (state IN ('closed', 'open', 'half_open')),
    consecutive_failures integer NOT NULL DEFAULT 0,
    -- Openings since the circuit last closed: the cool-down doubles with each.
    openings integer NOT NULL DEFAULT 0,
    opened_at timestamptz,
    next_probe_at timestamptz,
    last_failure text,
    last_failure_at timestamptz,
    last_success_at timestamptz,
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (project_id, endpoint)
);

-- Every endpoint in use or with a circuit, its state and load. The operator's view; closing a
-- circuit by hand is `fhir_outbox.reset_endpoint`.
CREATE VIEW fhir_outbox.endpoint_health AS
WITH endpoints AS (
    SELECT DISTINCT project_id, endpoint FROM fhir_outbox.subscription_endpoint
    WHERE endpoint IS NOT NULL
    UNION
    SELECT project_id, endpoint FROM fhir_outbox.endpoint_circuit
),
load AS (
    SELECT e.project_id, e.endpoint,
           count(*) FILTER (WHERE d.state = 'in_flight') AS in_flight,
           count(*) FILTER (WHERE d.state = 'pending') AS pending,
           count(DISTINCT d.subscription_id) AS subscriptions_waiting
    FROM fhir_outbox.delivery d
    JOIN fhir_outbox.subscription_endpoint e USING (project_id, subscription_id)
    WHERE d.state IN ('pending', 'in_flight')
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

-- Closes an endpoint's circuit (an operator who fixed the receiver need not wait for the probe).
-- Returns whether there was a circuit to close.
CREATE FUNCTION fhir_outbox.reset_endpoint(p_project_id uuid, p_endpoint text) RETURNS boolean
    LANGUAGE sql
AS $$
    WITH removed AS (
        DELETE FROM fhir_outbox.endpoint_circuit
        WHERE project_id = p_project_id
          AND endpoint = fhir_outbox.endpoint_origin(p_endpoint)
        RETURNING 1)
    SELECT count(*) > 0 FROM removed
$$;
