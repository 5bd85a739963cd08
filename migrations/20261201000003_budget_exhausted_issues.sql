-- A subscription version whose evaluation exhausted its budget (FHIRPath work or memory) is
-- suspended: recorded once here with kind `budget_exhausted`, never evaluated again by any
-- dispatcher (they read these rows when they load subscriptions), until a new version of the
-- subscription is written.
ALTER TABLE fhir_outbox.subscription_issue
    DROP CONSTRAINT subscription_issue_kind_check,
    ADD CONSTRAINT subscription_issue_kind_check
        CHECK (kind IN ('unsupported', 'invalid', 'evaluation_error', 'budget_exhausted'));

-- Operators see both in the status view (new columns at the end; the others are unchanged):
-- how many problems are recorded for the subscription's current version, and why it is suspended.
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
       i.suspended_reason
FROM fhir_outbox.resource r
JOIN fhir_outbox.resource_version v USING (project_id, resource_type, id, version_id)
LEFT JOIN fhir_outbox.subscription_pause p ON p.project_id = r.project_id AND p.subscription_id = r.id
LEFT JOIN LATERAL (
    SELECT count(*) FILTER (WHERE x.state = 'pending')   AS pending,
           count(*) FILTER (WHERE x.state = 'in_flight') AS in_flight,
           count(*) FILTER (WHERE x.state = 'succeeded') AS succeeded,
           count(*) FILTER (WHERE x.state = 'skipped')   AS skipped,
           count(*) FILTER (WHERE x.state = 'failed')    AS failed,
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
