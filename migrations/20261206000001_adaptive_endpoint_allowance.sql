-- An endpoint's in-flight allowance adapts to how it answers (docs/isolation.md, "Per-endpoint
-- allowance"). A fixed allowance counts deliveries from claim until their outcome is recorded, so
-- with one fast receiver the pipeline's own cycle, not the receiver, set the rate: 32 deliveries
-- per ~25 ms cycle capped it near 1,300/s (docs/performance.md, peer harness). Now the recorder
-- doubles the allowance of an endpoint whose attempts in a batch were all fast healthy answers, up
-- to the configured maximum, and puts it back to the configured base at the first slow answer,
-- 429, server error or failure to answer. NULL: the base (which then follows the configuration).
ALTER TABLE fhir_outbox.endpoint_circuit
    ADD COLUMN allowance integer CHECK (allowance > 0);

COMMENT ON COLUMN fhir_outbox.endpoint_circuit.allowance IS
    'Deliveries in progress allowed to this endpoint, when grown beyond the configured base; NULL: the base';

-- The same view with the allowance appended (a view's columns may only be added at its end).
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
          FROM (SELECT project_id, subscription_id, 'pending' AS state FROM fhir_outbox.unfinished_delivery
                WHERE state = 'pending'
                UNION ALL
                SELECT project_id, subscription_id, 'in_flight' FROM fhir_outbox.unfinished_delivery
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
       coalesce(l.pending, 0) AS pending,
       c.allowance
FROM endpoints e
LEFT JOIN fhir_outbox.endpoint_circuit c USING (project_id, endpoint)
LEFT JOIN load l USING (project_id, endpoint);
