-- The claim walks each lane of the hot table on its own (docs/performance.md, run AH).
--
-- `claim_deliveries` finds the busy subscriptions by a skip scan of `delivery_queue` from the
-- claim cursor: each step asks for the first pending entry of a later subscription. Over the
-- partitioned table that step is a Merge Append of both lanes, and each step starts again in each
-- lane from the previous subscription found in either. When a lane holds the dead entries of many
-- subscriptions that only the other lane still serves (a draining lane after a backlog, with a few
-- subscriptions whose deliveries wait there), every step read that lane from the previous
-- subscription to its next live entry, past the same dead entries again: a claim of 100
-- subscriptions read 8,200 pages of that index in `bench --only noisy` (bad endpoints' deliveries
-- in the draining lane), and 47,000 when the subscriptions' ids followed their creation order
-- (the healthy ones one run of dead entries). Now each lane is walked by its own recursion, from
-- one live entry to the next, so each dead entry is passed at most once per claim, and the two
-- walks are merged: the first `queues_per_claim` subscriptions after the cursor in either lane,
-- each with its first pending delivery in either lane, as before. The rest is unchanged.

CREATE OR REPLACE FUNCTION fhir_outbox.claim_deliveries(max_claimed bigint, lease_seconds double precision, endpoint_base bigint, probe_seconds double precision, queues_per_claim bigint, endpoint_max bigint) RETURNS TABLE(id bigint, webhook_id uuid, project_id uuid, subscription_id text, resource_type text, resource_id text, version_id bigint, interaction text, changed_at timestamp with time zone, request_id text, trace_id text, attempts integer, preamble_failures integer, claims integer, lease_token uuid, endpoint text, probe boolean, replay boolean, notification text, event_number bigint, current_version bigint, deleted boolean, content text, content_of bigint, first_of_subscription boolean, subscription text, settings text)
    LANGUAGE plpgsql
    SET plan_cache_mode TO 'force_generic_plan'
    SET jit TO 'off'
    SET enable_seqscan TO 'off'
    SET enable_bitmapscan TO 'off'
    AS $$
#variable_conflict use_column
BEGIN
    PERFORM pg_advisory_xact_lock(hashtext('fhir_outbox.delivery_claim'));
    PERFORM set_config('synchronous_commit', 'off', true);
    RETURN QUERY WITH RECURSIVE
    -- The round goes on after the cursor… (its values are init-plan parameters, so that
    -- both bounds of each step are index conditions, never filters; the order includes
    -- the due time so that only `delivery_queue`, which holds pending rows alone, serves it,
    -- never an index that also holds the finished history). Each lane is walked on its own
    -- and the two walks merged: one walk over both lanes started every step in each lane, so
    -- a lane whose next pending entry lay far ahead, past the dead entries of groups that
    -- only the other lane still serves, was read that far again at every step.
    ahead0 AS (
        (SELECT d.project_id, d.subscription_id, d.next_attempt_at, d.id, 1::int8 AS n
         FROM fhir_outbox.unfinished_delivery d
         WHERE d.lane = 0 AND d.state = 'pending'
           AND (d.project_id, d.subscription_id)
               > (coalesce((SELECT project_id FROM fhir_outbox.claim_cursor), '00000000-0000-0000-0000-000000000000'),
                  coalesce((SELECT subscription_id FROM fhir_outbox.claim_cursor), ''))
         ORDER BY d.project_id, d.subscription_id, d.next_attempt_at, d.id LIMIT 1)
        UNION ALL
        SELECT x.project_id, x.subscription_id, x.next_attempt_at, x.id, q.n + 1 FROM ahead0 q CROSS JOIN LATERAL (
            SELECT d.project_id, d.subscription_id, d.next_attempt_at, d.id FROM fhir_outbox.unfinished_delivery d
            WHERE d.lane = 0 AND d.state = 'pending'
              AND (d.project_id, d.subscription_id) > (q.project_id, q.subscription_id)
            ORDER BY d.project_id, d.subscription_id, d.next_attempt_at, d.id LIMIT 1) x
        WHERE q.n < queues_per_claim),
    ahead1 AS (
        (SELECT d.project_id, d.subscription_id, d.next_attempt_at, d.id, 1::int8 AS n
         FROM fhir_outbox.unfinished_delivery d
         WHERE d.lane = 1 AND d.state = 'pending'
           AND (d.project_id, d.subscription_id)
               > (coalesce((SELECT project_id FROM fhir_outbox.claim_cursor), '00000000-0000-0000-0000-000000000000'),
                  coalesce((SELECT subscription_id FROM fhir_outbox.claim_cursor), ''))
         ORDER BY d.project_id, d.subscription_id, d.next_attempt_at, d.id LIMIT 1)
        UNION ALL
        SELECT x.project_id, x.subscription_id, x.next_attempt_at, x.id, q.n + 1 FROM ahead1 q CROSS JOIN LATERAL (
            SELECT d.project_id, d.subscription_id, d.next_attempt_at, d.id FROM fhir_outbox.unfinished_delivery d
            WHERE d.lane = 1 AND d.state = 'pending'
              AND (d.project_id, d.subscription_id) > (q.project_id, q.subscription_id)
            ORDER BY d.project_id, d.subscription_id, d.next_attempt_at, d.id LIMIT 1) x
        WHERE q.n < queues_per_claim),
    ahead AS (
        SELECT g.project_id, g.subscription_id, g.next_attempt_at, g.id,
               row_number() OVER (ORDER BY g.project_id, g.subscription_id) AS n
        FROM (SELECT DISTINCT ON (w.project_id, w.subscription_id)
                     w.project_id, w.subscription_id, w.next_attempt_at, w.id
              FROM (SELECT * FROM ahead0 UNION ALL SELECT * FROM ahead1) w
              ORDER BY w.project_id, w.subscription_id, w.next_attempt_at, w.id) g
        ORDER BY g.project_id, g.subscription_id LIMIT queues_per_claim),
    -- …and starts again from the first, up to the cursor, while the window has room.
    behind0 AS (
        (SELECT d.project_id, d.subscription_id, d.next_attempt_at, d.id, (SELECT count(*) FROM ahead) + 1 AS n
         FROM fhir_outbox.unfinished_delivery d
         WHERE d.lane = 0 AND d.state = 'pending'
           AND (d.project_id, d.subscription_id)
               <= (coalesce((SELECT project_id FROM fhir_outbox.claim_cursor), '00000000-0000-0000-0000-000000000000'),
                   coalesce((SELECT subscription_id FROM fhir_outbox.claim_cursor), ''))
         ORDER BY d.project_id, d.subscription_id, d.next_attempt_at, d.id LIMIT 1)
        UNION ALL
        SELECT x.project_id, x.subscription_id, x.next_attempt_at, x.id, q.n + 1 FROM behind0 q CROSS JOIN LATERAL (
            SELECT d.project_id, d.subscription_id, d.next_attempt_at, d.id FROM fhir_outbox.unfinished_delivery d
            WHERE d.lane = 0 AND d.state = 'pending'
              AND (d.project_id, d.subscription_id) > (q.project_id, q.subscription_id)
              AND (d.project_id, d.subscription_id)
                  <= (coalesce((SELECT project_id FROM fhir_outbox.claim_cursor), '00000000-0000-0000-0000-000000000000'),
                      coalesce((SELECT subscription_id FROM fhir_outbox.claim_cursor), ''))
            ORDER BY d.project_id, d.subscription_id, d.next_attempt_at, d.id LIMIT 1) x
        WHERE q.n < queues_per_claim),
    behind1 AS (
        (SELECT d.project_id, d.subscription_id, d.next_attempt_at, d.id, (SELECT count(*) FROM ahead) + 1 AS n
         FROM fhir_outbox.unfinished_delivery d
         WHERE d.lane = 1 AND d.state = 'pending'
           AND (d.project_id, d.subscription_id)
               <= (coalesce((SELECT project_id FROM fhir_outbox.claim_cursor), '00000000-0000-0000-0000-000000000000'),
                   coalesce((SELECT subscription_id FROM fhir_outbox.claim_cursor), ''))
         ORDER BY d.project_id, d.subscription_id, d.next_attempt_at, d.id LIMIT 1)
        UNION ALL
        SELECT x.project_id, x.subscription_id, x.next_attempt_at, x.id, q.n + 1 FROM behind1 q CROSS JOIN LATERAL (
            SELECT d.project_id, d.subscription_id, d.next_attempt_at, d.id FROM fhir_outbox.unfinished_delivery d
            WHERE d.lane = 1 AND d.state = 'pending'
              AND (d.project_id, d.subscription_id) > (q.project_id, q.subscription_id)
              AND (d.project_id, d.subscription_id)
                  <= (coalesce((SELECT project_id FROM fhir_outbox.claim_cursor), '00000000-0000-0000-0000-000000000000'),
                      coalesce((SELECT subscription_id FROM fhir_outbox.claim_cursor), ''))
            ORDER BY d.project_id, d.subscription_id, d.next_attempt_at, d.id LIMIT 1) x
        WHERE q.n < queues_per_claim),
    behind AS (
        SELECT g.project_id, g.subscription_id, g.next_attempt_at, g.id,
               (SELECT count(*) FROM ahead) + row_number() OVER (ORDER BY g.project_id, g.subscription_id) AS n
        FROM (SELECT DISTINCT ON (w.project_id, w.subscription_id)
                     w.project_id, w.subscription_id, w.next_attempt_at, w.id
              FROM (SELECT * FROM behind0 UNION ALL SELECT * FROM behind1) w
              ORDER BY w.project_id, w.subscription_id, w.next_attempt_at, w.id) g
        ORDER BY g.project_id, g.subscription_id LIMIT queues_per_claim),
    visited AS (
        SELECT project_id, subscription_id, next_attempt_at, id, n FROM ahead
        UNION ALL
        SELECT project_id, subscription_id, next_attempt_at, id, n FROM behind WHERE n <= queues_per_claim),
    -- An upsert: the cursor is unlogged, and a crash of PostgreSQL empties it (the round
    -- then starts again from the first subscription, as the coalesces above read it).
    advanced AS (
        INSERT INTO fhir_outbox.claim_cursor AS k (project_id, subscription_id)
        SELECT project_id, subscription_id FROM visited ORDER BY n DESC LIMIT 1
        ON CONFLICT (only_row) DO UPDATE
        SET project_id = EXCLUDED.project_id, subscription_id = EXCLUDED.subscription_id
        RETURNING 1),
    queues AS (SELECT project_id, subscription_id, next_attempt_at AS first_at, id AS first_id FROM visited),
    busy AS (
        SELECT project_id, subscription_id, count(*) AS in_flight FROM fhir_outbox.unfinished_delivery
        WHERE state = 'in_flight' AND lease_expires_at >= now()
        GROUP BY project_id, subscription_id),
    expired AS (
        SELECT id, project_id, subscription_id FROM fhir_outbox.unfinished_delivery
        WHERE state = 'in_flight' AND lease_expires_at < now()
        ORDER BY lease_expires_at LIMIT max_claimed),
    -- A deleted subscription (or one without an endpoint) is an endpoint of its own.
    -- Each by its key (a subquery per subscription): as a join, a plan that reads every
    -- Subscription of every project at every claim can look cheaper (run AF).
    subscriptions AS (
        SELECT s.project_id, s.subscription_id,
               coalesce((SELECT e.endpoint FROM fhir_outbox.subscription_endpoint e
                         WHERE e.project_id = s.project_id
                           AND e.subscription_id = s.subscription_id),
                        'Subscription/' || s.subscription_id) AS endpoint
        FROM (SELECT project_id, subscription_id FROM queues
              UNION SELECT project_id, subscription_id FROM busy
              UNION SELECT project_id, subscription_id FROM expired) s),
    endpoint_load AS (
        SELECT s.project_id, s.endpoint, sum(b.in_flight) AS in_flight
        FROM subscriptions s JOIN busy b USING (project_id, subscription_id)
        GROUP BY s.project_id, s.endpoint),
    -- Enough from each queue to fill the claim if every queue is busy, never more than an
    -- endpoint may take nor than the claim can use (each candidate costs the ranking).
    per_queue AS (
        SELECT greatest(1, least(endpoint_max::int8, max_claimed::int8, ceil(2.0 * max_claimed / greatest(1, count(*)))::int8)) AS k
        FROM queues),
    candidates AS (
        SELECT e.id, e.project_id, e.subscription_id, 0::int8 AS turn FROM expired e
        UNION ALL
        SELECT c.id, q.project_id, q.subscription_id, c.turn
        FROM queues q CROSS JOIN per_queue CROSS JOIN LATERAL (
            SELECT f.id, row_number() OVER (ORDER BY f.next_attempt_at, f.id) AS turn
            FROM (SELECT d.id, d.next_attempt_at FROM fhir_outbox.unfinished_delivery d
                  WHERE d.project_id = q.project_id AND d.subscription_id = q.subscription_id
                    AND d.state = 'pending' AND d.next_attempt_at <= now()
                    AND (d.next_attempt_at, d.id) >= (q.first_at, q.first_id)
                  ORDER BY d.next_attempt_at, d.id LIMIT per_queue.k) f) c),
    ranked AS (
        SELECT c.id, c.project_id, s.endpoint,
               row_number() OVER (PARTITION BY c.project_id, s.endpoint
                                  ORDER BY c.turn, c.id) AS endpoint_turn,
               row_number() OVER (PARTITION BY c.project_id
                                  ORDER BY c.turn, random()) AS project_turn
        FROM candidates c JOIN subscriptions s USING (project_id, subscription_id)
        WHERE NOT EXISTS (SELECT 1 FROM fhir_outbox.subscription_pause p
                          WHERE p.project_id = c.project_id
                            AND p.subscription_id = c.subscription_id)),
    allowed AS (
        SELECT r.id, r.project_id, r.endpoint, r.project_turn,
               coalesce(ec.state, 'closed') <> 'closed' AS probe
        FROM ranked r
        LEFT JOIN endpoint_load l USING (project_id, endpoint)
        LEFT JOIN fhir_outbox.endpoint_circuit ec USING (project_id, endpoint)
        WHERE CASE WHEN coalesce(ec.state, 'closed') = 'closed'
                   THEN r.endpoint_turn <= greatest(endpoint_base::int8, least(coalesce(ec.allowance::int8, endpoint_base::int8), endpoint_max::int8))
                                           - coalesce(l.in_flight, 0)
                   ELSE ec.next_probe_at <= now() AND r.endpoint_turn = 1
                        AND coalesce(l.in_flight, 0) = 0 END),
    -- Rows of the hot table are found by `id = ANY (array)`, never by a join, so that no
    -- plan can scan a lane once per row.
    picked AS (
        SELECT d.id FROM fhir_outbox.unfinished_delivery d
        WHERE d.id = ANY (ARRAY(SELECT id FROM allowed ORDER BY project_turn, random() LIMIT max_claimed))
          AND (d.state = 'pending' OR (d.state = 'in_flight' AND d.lease_expires_at < now()))
        FOR UPDATE OF d SKIP LOCKED),
    probing AS (
        UPDATE fhir_outbox.endpoint_circuit ec
        SET state = 'half_open', next_probe_at = now() + make_interval(secs => probe_seconds),
            updated_at = now()
        FROM allowed a JOIN picked USING (id)
        WHERE a.probe AND ec.project_id = a.project_id AND ec.endpoint = a.endpoint
        RETURNING ec.endpoint),
    claimed AS (
        UPDATE fhir_outbox.unfinished_delivery d
        SET state = 'in_flight', lease_token = gen_random_uuid(),
            lease_expires_at = now() + make_interval(secs => lease_seconds), claims = d.claims + 1,
            -- Into the current lane, so that the other one drains (migration 20261203000001);
            -- read once per statement (the function would run per row).
            lane = (SELECT current FROM fhir_outbox.delivery_lane)
        WHERE d.id = ANY (ARRAY(SELECT id FROM picked))
        RETURNING d.*),
    numbered AS (
        SELECT c.*, a.endpoint, a.probe,
               row_number() OVER (PARTITION BY c.project_id, c.subscription_id ORDER BY c.id) = 1
                   AS first_of_subscription,
               -- The deliveries of one change share the content it sends.
               first_value(c.id) OVER (PARTITION BY c.resource_project_id, c.resource_type,
                                                    c.resource_id, c.version_id, c.interaction
                                       ORDER BY c.id) AS content_of
        FROM claimed c JOIN allowed a USING (id))
    SELECT c.id, c.webhook_id, c.project_id, c.subscription_id, c.resource_type, c.resource_id, c.version_id,
           c.interaction, c.changed_at, c.request_id, c.trace_id,
           c.attempts, c.preamble_failures, c.claims, c.lease_token,
           c.endpoint, c.probe, c.replay,
           c.notification, c.event_number,
           r.version_id AS current_version, coalesce(r.deleted, false) AS deleted,
           -- A delete's tombstone directly follows the last live version: that is the one read.
           -- Read by the first delivery of each change alone (see `content_of`).
           CASE WHEN c.content_of = c.id THEN
               (SELECT v.content::text FROM fhir_outbox.resource_version v
                WHERE v.project_id = c.resource_project_id AND v.resource_type = c.resource_type
                  AND v.id = c.resource_id
                  AND v.version_id = CASE WHEN c.interaction = 'delete' THEN c.version_id - 1
                                          ELSE c.version_id END) END AS content,
           nullif(c.content_of, c.id) AS content_of, c.first_of_subscription,
           -- Read for the first delivery of each subscription alone (a CASE runs its subqueries
           -- only when its condition holds; a join would probe the indexes for every delivery).
           CASE WHEN c.first_of_subscription THEN
               (SELECT sv.content::text
                FROM fhir_outbox.resource sr
                JOIN fhir_outbox.resource_version sv
                  ON sv.project_id = sr.project_id AND sv.resource_type = sr.resource_type
                 AND sv.id = sr.id AND sv.version_id = sr.version_id
                WHERE sr.project_id = c.project_id AND sr.resource_type = 'Subscription'
                  AND sr.id = c.subscription_id AND NOT sr.deleted) END AS subscription,
           CASE WHEN c.first_of_subscription THEN
               coalesce((SELECT p.settings FROM fhir_outbox.project p WHERE p.id = c.project_id),
                        '{}')::text END AS settings
    FROM numbered c
    LEFT JOIN fhir_outbox.resource r
           ON r.project_id = c.resource_project_id AND r.resource_type = c.resource_type
          AND r.id = c.resource_id
    ORDER BY c.id;
END
$$;
