-- The recorder writes the endpoints' circuits in one call (docs/performance.md, run V). They were
-- two statements, each a round trip of its own in every recorded batch: about 0.1 ms of CPU on each
-- side per round trip on the development VM, which at a few hundred changes a second (a batch per
-- change) was more than either statement's own work. The rules are those of
-- `delivery::queries::record_endpoint_results` before (which says why each), unchanged: the circuits
-- that need one are created first (in key order), then the ones with something to change are locked
-- (in key order, so that two recorders never deadlock), updated, and the changes of state returned.
-- A plpgsql function because the update must see the rows the insert created: statements of one
-- function see each other's writes, CTEs of one statement do not.
CREATE FUNCTION fhir_outbox.record_endpoint_results(
    p_projects uuid[], p_endpoints text[], p_healthy bool[], p_failures int4[],
    p_last_failures text[], p_fast bool[], p_threshold int4, p_cool_downs float8[], p_base int4,
    p_max int4)
RETURNS TABLE (project_id uuid, endpoint text, from_state text, to_state text,
               consecutive_failures int4, next_probe_at timestamptz)
LANGUAGE plpgsql
AS $$
#variable_conflict use_column
BEGIN
    INSERT INTO fhir_outbox.endpoint_circuit (project_id, endpoint)
    SELECT r.project_id, r.endpoint
    FROM unnest(p_projects, p_endpoints, p_failures, p_fast) AS r(project_id, endpoint, failures, fast)
    WHERE r.failures > 0 OR (r.fast AND p_max > p_base)
    ORDER BY r.project_id, r.endpoint
    ON CONFLICT DO NOTHING;
    RETURN QUERY
    WITH r AS (
            SELECT * FROM unnest(p_projects, p_endpoints, p_healthy, p_failures, p_last_failures,
                                 p_fast)
                AS r(project_id, endpoint, healthy, failures, last_failure, fast)),
        old AS (
            SELECT ec.project_id, ec.endpoint, ec.state, ec.consecutive_failures, ec.openings
            FROM fhir_outbox.endpoint_circuit ec JOIN r USING (project_id, endpoint)
            WHERE r.failures > 0 OR ec.state <> 'closed' OR ec.consecutive_failures > 0
               OR (r.fast AND coalesce(ec.allowance, p_base) < p_max)
               OR (NOT r.fast AND ec.allowance IS NOT NULL)
            -- Locked in one order by every recorder, so that two never deadlock.
            ORDER BY ec.project_id, ec.endpoint
            FOR UPDATE OF ec),
        counted AS (
            SELECT o.*, r.healthy, r.failures, r.last_failure, r.fast,
                   CASE WHEN r.healthy THEN r.failures
                        ELSE o.consecutive_failures + r.failures END AS consecutive
            FROM old o JOIN r USING (project_id, endpoint)),
        decided AS (
            SELECT c.*, CASE
                WHEN c.state <> 'open' AND c.failures > 0
                     AND (c.consecutive >= p_threshold OR c.state = 'half_open') THEN 'open'
                WHEN c.healthy AND c.consecutive < p_threshold THEN 'closed'
                ELSE c.state END AS new_state
            FROM counted c),
        updated AS (
            UPDATE fhir_outbox.endpoint_circuit ec
            SET state = d.new_state,
                consecutive_failures = d.consecutive,
                openings = CASE WHEN d.new_state = 'closed' THEN 0
                                WHEN d.new_state = 'open' AND d.state <> 'open' THEN ec.openings + 1
                                ELSE ec.openings END,
                opened_at = CASE WHEN d.new_state = 'closed' THEN NULL
                                 WHEN d.state = 'closed' AND d.new_state = 'open' THEN now()
                                 ELSE ec.opened_at END,
                next_probe_at = CASE
                    WHEN d.new_state = 'closed' THEN NULL
                    WHEN d.new_state = 'open' AND d.state <> 'open'
                        THEN now() + make_interval(secs => p_cool_downs[
                                 least(ec.openings + 1, cardinality(p_cool_downs))])
                    ELSE ec.next_probe_at END,
                last_failure = coalesce(d.last_failure, ec.last_failure),
                last_failure_at = CASE WHEN d.failures > 0 THEN now() ELSE ec.last_failure_at END,
                -- Doubles from what is stored, or back to the base (NULL).
                allowance = CASE WHEN d.fast
                    THEN nullif(least(greatest(coalesce(ec.allowance, p_base), p_base) * 2, p_max), p_base) END,
                updated_at = now()
            FROM decided d
            WHERE ec.project_id = d.project_id AND ec.endpoint = d.endpoint
            RETURNING ec.project_id, ec.endpoint, d.state AS from_state, ec.state AS to_state,
                      ec.consecutive_failures, ec.next_probe_at)
        SELECT u.project_id, u.endpoint, u.from_state, u.to_state, u.consecutive_failures,
               u.next_probe_at
        FROM updated u WHERE u.from_state <> u.to_state;
END
$$;
