--
-- PostgreSQL database dump
--

--
-- Name: fhir_outbox; Type: SCHEMA; Schema: -; Owner: -
--

CREATE SCHEMA fhir_outbox;

--
-- Name: analyze_stale_tables(interval); Type: FUNCTION; Schema: fhir_outbox; Owner: -
--

CREATE FUNCTION fhir_outbox.analyze_stale_tables(p_min_age interval) RETURNS TABLE(table_name text, pages_before bigint, pages bigint)
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
    v_block_size bigint := current_setting('block_size')::bigint;
    v_table      record;
BEGIN
    IF NOT pg_try_advisory_xact_lock(hashtext('fhir_outbox.planner_statistics')) THEN
        RETURN;
    END IF;
    PERFORM set_config('lock_timeout', '50ms', true);
    FOR v_table IN
        SELECT t.relname, t.relpages, t.pages
        FROM (SELECT c.oid, c.relname, greatest(c.relpages, 0)::bigint AS relpages,
                     pg_relation_size(c.oid) / v_block_size AS pages
              FROM pg_class c
              JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE n.nspname = 'fhir_outbox' AND c.relkind = 'r'
                AND NOT EXISTS (SELECT FROM pg_inherits i JOIN pg_class h ON h.oid = i.inhparent
                                WHERE i.inhrelid = c.oid
                                  AND h.relname IN ('finished_delivery', 'delivery_attempt', 'audit_event'))) t
        LEFT JOIN pg_stat_user_tables s ON s.relid = t.oid
        WHERE t.pages >= 32 AND t.pages > 2 * t.relpages
          AND coalesce(greatest(s.last_analyze, s.last_autoanalyze), '-infinity') < now() - p_min_age
        ORDER BY t.pages DESC
    LOOP
        BEGIN
            EXECUTE format('ANALYZE fhir_outbox.%I', v_table.relname);
        EXCEPTION WHEN lock_not_available THEN
            CONTINUE;
        END;
        table_name := v_table.relname;
        pages_before := v_table.relpages;
        pages := v_table.pages;
        RETURN NEXT;
    END LOOP;
END
$$;

--
-- Name: check_project_settings(); Type: FUNCTION; Schema: fhir_outbox; Owner: -
--

CREATE FUNCTION fhir_outbox.check_project_settings() RETURNS trigger
    LANGUAGE plpgsql
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $_$
DECLARE
    v_triggers jsonb := NEW.settings -> 'subscriptionAutoDisable';
    v_trigger  jsonb;
    v_name     text;
BEGIN
    FOREACH v_name IN ARRAY ARRAY['redactAuditEvents', 'preCommitSubscriptionsEnabled'] LOOP
        IF NEW.settings ? v_name AND jsonb_typeof(NEW.settings -> v_name) <> 'boolean' THEN
            RAISE EXCEPTION 'invalid project settings: % must be true or false, not %',
                v_name, NEW.settings -> v_name USING ERRCODE = 'OB012';
        END IF;
    END LOOP;
    IF v_triggers IS NULL THEN
        RETURN NEW;
    END IF;
    IF jsonb_typeof(v_triggers) = 'string' THEN
        BEGIN
            v_triggers := (v_triggers #>> '{}')::jsonb;
        EXCEPTION WHEN invalid_text_representation THEN
            RAISE EXCEPTION 'invalid project settings: subscriptionAutoDisable is a string that is not JSON'
                USING ERRCODE = 'OB012';
        END;
    END IF;
    IF jsonb_typeof(v_triggers) <> 'array' THEN
        RAISE EXCEPTION 'invalid project settings: subscriptionAutoDisable must be an array of {maxConsecutiveFailures, timeWindowSeconds}, not %',
            jsonb_typeof(v_triggers) USING ERRCODE = 'OB012';
    END IF;
    FOR v_trigger IN SELECT jsonb_array_elements(v_triggers) LOOP
        IF jsonb_typeof(v_trigger) <> 'object'
           OR (SELECT count(*) FROM jsonb_object_keys(v_trigger) k
               WHERE k NOT IN ('maxConsecutiveFailures', 'timeWindowSeconds')) > 0
           OR jsonb_typeof(v_trigger -> 'maxConsecutiveFailures') IS DISTINCT FROM 'number'
           OR jsonb_typeof(v_trigger -> 'timeWindowSeconds') IS DISTINCT FROM 'number'
           OR (v_trigger ->> 'maxConsecutiveFailures') !~ '^[1-9][0-9]{0,8}$'
           OR (v_trigger ->> 'timeWindowSeconds') !~ '^[1-9][0-9]{0,8}$' THEN
            RAISE EXCEPTION 'invalid project settings: subscriptionAutoDisable entry % must be {"maxConsecutiveFailures": n, "timeWindowSeconds": n} with whole numbers above 0',
                v_trigger USING ERRCODE = 'OB012';
        END IF;
    END LOOP;
    RETURN NEW;
END
$_$;

--
-- Name: checked_content(uuid, jsonb); Type: FUNCTION; Schema: fhir_outbox; Owner: -
--

CREATE FUNCTION fhir_outbox.checked_content(p_project uuid, p_resource jsonb) RETURNS jsonb
    LANGUAGE plpgsql STABLE
    AS $$
DECLARE
    v_content jsonb := fhir_outbox.checked_shape(p_resource);
    v_type    text := p_resource ->> 'resourceType';
BEGIN
    IF NOT EXISTS (SELECT 1 FROM fhir_outbox.resource_type WHERE name = v_type) THEN
        RAISE EXCEPTION 'unknown resourceType "%"', left(v_type, 100) USING ERRCODE = 'OB002';
    END IF;
    IF NOT EXISTS (SELECT 1 FROM fhir_outbox.project WHERE id = p_project) THEN
        RAISE EXCEPTION 'unknown project %', coalesce(p_project::text, 'NULL') USING ERRCODE = 'OB005';
    END IF;
    RETURN v_content;
END
$$;

--
-- Name: checked_context(text, text); Type: FUNCTION; Schema: fhir_outbox; Owner: -
--

CREATE FUNCTION fhir_outbox.checked_context(p_request_id text, p_trace_id text, OUT request_id text, OUT trace_id text) RETURNS record
    LANGUAGE plpgsql
    AS $_$
BEGIN
    IF p_request_id IS NULL THEN
        request_id := gen_random_uuid()::text;
    ELSIF p_request_id = '' OR length(p_request_id) > 200 THEN
        RAISE EXCEPTION 'request id must be 1 to 200 characters' USING ERRCODE = 'OB010';
    ELSE
        request_id := p_request_id;
    END IF;
    IF p_trace_id IS NULL THEN
        trace_id := gen_random_uuid()::text;
    ELSIF p_trace_id !~* '^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$'
          AND p_trace_id !~* '^([0-9a-f]{2}-)?[0-9a-f]{32}-[0-9a-f]{16}(-[0-9a-f]{1,2})?$' THEN
        RAISE EXCEPTION 'trace id "%" is neither a UUID nor a W3C traceparent', left(p_trace_id, 100)
            USING ERRCODE = 'OB010';
    ELSE
        trace_id := p_trace_id;
    END IF;
END
$_$;

--
-- Name: checked_shape(jsonb); Type: FUNCTION; Schema: fhir_outbox; Owner: -
--

CREATE FUNCTION fhir_outbox.checked_shape(p_resource jsonb) RETURNS jsonb
    LANGUAGE plpgsql STABLE
    AS $_$
DECLARE
    v_text  text;
    v_bytes bytea;
    v_limit bigint := coalesce(nullif(current_setting('fhir_outbox.max_resource_bytes', true), '')::bigint, 4194304);
BEGIN
    IF p_resource IS NULL OR jsonb_typeof(p_resource) <> 'object' THEN
        RAISE EXCEPTION 'resource must be a JSON object, got %', coalesce(jsonb_typeof(p_resource), 'nothing')
            USING ERRCODE = 'OB001';
    END IF;
    v_text := p_resource::text;
    IF octet_length(v_text) > v_limit THEN
        RAISE EXCEPTION 'resource is % bytes, over the limit of % bytes (setting fhir_outbox.max_resource_bytes)',
            octet_length(v_text), v_limit
            USING ERRCODE = 'OB006', DETAIL = octet_length(v_text) || ' ' || v_limit;
    END IF;
    -- `.**{100}` reaches what lies 100 steps below the resource object, so an array or object
    -- there is level 101 as serde_json counts. Strict mode, because lax mode unwraps arrays and
    -- would not count them as levels. One C-implemented walk, no deeper than the limit.
    IF jsonb_path_exists(p_resource, 'strict $.**{100} ? (@.type() == "object" || @.type() == "array")') THEN
        RAISE EXCEPTION 'resource is nested too deeply: more than 100 levels of objects and arrays'
            USING ERRCODE = 'OB001';
    END IF;
    IF jsonb_typeof(p_resource -> 'resourceType') IS DISTINCT FROM 'string' THEN
        RAISE EXCEPTION 'resource has no resourceType string' USING ERRCODE = 'OB001';
    END IF;
    IF p_resource ? 'meta' AND jsonb_typeof(p_resource -> 'meta') <> 'object' THEN
        RAISE EXCEPTION 'meta must be a JSON object, got %', jsonb_typeof(p_resource -> 'meta')
            USING ERRCODE = 'OB001';
    END IF;
    -- The full recursive pass is only needed when something could be empty.
    -- As bytes: `position` in a bytea is a plain byte search, several times cheaper than `LIKE`
    -- or a regular expression on text (the patterns are ASCII, so bytes or characters are the same).
    v_bytes := convert_to(v_text, 'UTF8');
    IF position('\x2222'::bytea IN v_bytes) > 0 OR position('\x7b7d'::bytea IN v_bytes) > 0
       OR position('\x5b5d'::bytea IN v_bytes) > 0 THEN
        -- The recursive pass can exhaust the stack on absurdly deep input: name the problem.
        BEGIN
            RETURN fhir_outbox.strip_empty(jsonb_strip_nulls(p_resource));
        EXCEPTION WHEN statement_too_complex THEN
            RAISE EXCEPTION 'resource is nested too deeply' USING ERRCODE = 'OB001';
        END;
    END IF;
    -- No `null` in the text (\x6e756c6c), no null to strip: the resource is returned as given.
    IF position('\x6e756c6c'::bytea IN v_bytes) = 0 THEN
        RETURN p_resource;
    END IF;
    RETURN jsonb_strip_nulls(p_resource);
END
$_$;

--
-- Name: claim_deliveries(bigint, double precision, bigint, double precision, bigint, bigint); Type: FUNCTION; Schema: fhir_outbox; Owner: -
--

CREATE FUNCTION fhir_outbox.claim_deliveries(max_claimed bigint, lease_seconds double precision, endpoint_base bigint, probe_seconds double precision, queues_per_claim bigint, endpoint_max bigint) RETURNS TABLE(id bigint, webhook_id uuid, project_id uuid, subscription_id text, resource_type text, resource_id text, version_id bigint, interaction text, changed_at timestamp with time zone, request_id text, trace_id text, attempts integer, preamble_failures integer, claims integer, lease_token uuid, endpoint text, probe boolean, replay boolean, notification text, event_number bigint, current_version bigint, deleted boolean, content text, content_of bigint, first_of_subscription boolean, subscription text, settings text)
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

--
-- Name: create_audit_events(uuid[], jsonb[]); Type: FUNCTION; Schema: fhir_outbox; Owner: -
--

CREATE FUNCTION fhir_outbox.create_audit_events(p_projects uuid[], p_events jsonb[]) RETURNS TABLE(ordinal bigint, audit_event_id text)
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
    v_at timestamptz := clock_timestamp();
BEGIN
    IF cardinality(p_projects) IS DISTINCT FROM cardinality(p_events) THEN
        RAISE EXCEPTION 'create_audit_events needs one project per event (% projects, % events)',
            cardinality(p_projects), cardinality(p_events) USING ERRCODE = 'OB001';
    END IF;
    IF EXISTS (SELECT 1 FROM unnest(p_events) AS e(event)
               WHERE event IS NULL OR jsonb_typeof(event) <> 'object'
                  OR event ->> 'resourceType' IS DISTINCT FROM 'AuditEvent') THEN
        RAISE EXCEPTION 'create_audit_events writes AuditEvent objects only' USING ERRCODE = 'OB001';
    END IF;
    RETURN QUERY
    WITH input AS MATERIALIZED (
        SELECT e.n, e.project_id, fhir_outbox.uuid_v7(v_at)::text AS new_id,
               CASE WHEN e.event::text ~ '""|\{\}|\[\]'
                    THEN fhir_outbox.strip_empty(jsonb_strip_nulls(e.event))
                    ELSE jsonb_strip_nulls(e.event) END AS content
        FROM unnest(p_projects, p_events) WITH ORDINALITY AS e(project_id, event, n)),
    stored AS (
        INSERT INTO fhir_outbox.audit_event (project_id, id, recorded_at, content)
        SELECT i.project_id, i.new_id, v_at,
               fhir_outbox.stamped(i.content, i.project_id, i.new_id, 1, v_at, NULL)
        FROM input i)
    SELECT i.n, i.new_id FROM input i ORDER BY i.n;
END
$$;

--
-- Name: create_project(text, jsonb, boolean); Type: FUNCTION; Schema: fhir_outbox; Owner: -
--

CREATE FUNCTION fhir_outbox.create_project(p_name text, p_settings jsonb DEFAULT '{}'::jsonb, p_server_scope boolean DEFAULT false) RETURNS uuid
    LANGUAGE plpgsql
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
    v_id uuid;
BEGIN
    IF p_name IS NULL OR btrim(p_name) = '' THEN
        RAISE EXCEPTION 'invalid project: the name is empty' USING ERRCODE = 'OB012';
    END IF;
    IF p_settings IS NULL OR jsonb_typeof(p_settings) <> 'object' THEN
        RAISE EXCEPTION 'invalid project: settings must be a JSON object, not %',
            coalesce(jsonb_typeof(p_settings), 'NULL') USING ERRCODE = 'OB012';
    END IF;
    INSERT INTO fhir_outbox.project (name, settings, server_scope)
    VALUES (p_name, p_settings, coalesce(p_server_scope, false))
    RETURNING id INTO v_id;
    RETURN v_id;
END
$$;

--
-- Name: create_resource(uuid, jsonb, text, text, text); Type: FUNCTION; Schema: fhir_outbox; Owner: -
--

CREATE FUNCTION fhir_outbox.create_resource(p_project uuid, p_resource jsonb, p_author text DEFAULT NULL::text, p_request_id text DEFAULT NULL::text, p_trace_id text DEFAULT NULL::text, OUT outcome text, OUT resource jsonb, OUT version_id bigint) RETURNS record
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
    v_content jsonb := fhir_outbox.checked_content(p_project, p_resource);
    v_ctx     record := fhir_outbox.checked_context(p_request_id, p_trace_id);
    v_type    text := v_content ->> 'resourceType';
    v_at      timestamptz := clock_timestamp();
    v_id      text := fhir_outbox.uuid_v7(v_at)::text;
BEGIN
    resource := fhir_outbox.stamped(v_content, p_project, v_id, 1, v_at, p_author);
    PERFORM fhir_outbox.held_project(p_project);
    INSERT INTO fhir_outbox.resource (project_id, resource_type, id, version_id, live_version_id, deleted, last_updated)
    VALUES (p_project, v_type, v_id, 1, 1, false, v_at);
    PERFORM fhir_outbox.write_version(p_project, v_type, v_id, 1, NULL, 'create', resource, v_at,
                                      p_author, v_ctx.request_id, v_ctx.trace_id);
    outcome := 'created';
    version_id := 1;
END
$$;

--
-- Name: create_resources(uuid, jsonb[], text, text, text); Type: FUNCTION; Schema: fhir_outbox; Owner: -
--

CREATE FUNCTION fhir_outbox.create_resources(p_project uuid, p_resources jsonb[], p_author text DEFAULT NULL::text, p_request_id text DEFAULT NULL::text, p_trace_id text DEFAULT NULL::text) RETURNS TABLE(ordinal integer, outcome text, resource jsonb, version_id bigint)
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
    v_ctx     record := fhir_outbox.checked_context(p_request_id, p_trace_id);
    v_at      timestamptz := clock_timestamp();
    v_meta    jsonb := fhir_outbox.server_meta(p_project, 1, v_at, p_author);
    v_count   integer := coalesce(cardinality(p_resources), 0);
    v_checked jsonb[];
    v_state   text;
    v_message text;
    v_detail  text;
    v_known   boolean;
BEGIN
    IF v_count > 10000 THEN
        RAISE EXCEPTION 'at most 10000 resources per call, got %', v_count USING ERRCODE = 'OB001';
    END IF;
    BEGIN
        -- The lookups of `checked_content`, once for the batch (an empty batch looks up nothing,
        -- as before). Their messages are never seen: any refusal is named by the fallback below.
        IF v_count > 0 AND NOT EXISTS (SELECT 1 FROM fhir_outbox.project WHERE id = p_project) THEN
            RAISE EXCEPTION 'unknown project' USING ERRCODE = 'OB005';
        END IF;
        SELECT array_agg(fhir_outbox.checked_shape(u.doc) ORDER BY u.n),
               bool_and(EXISTS (SELECT 1 FROM fhir_outbox.resource_type t WHERE t.name = u.doc ->> 'resourceType'))
        INTO v_checked, v_known
        FROM unnest(p_resources) WITH ORDINALITY AS u(doc, n);
        IF NOT v_known THEN
            RAISE EXCEPTION 'unknown resourceType' USING ERRCODE = 'OB002';
        END IF;
    EXCEPTION WHEN OTHERS THEN
        -- Which one: checked again one at a time (only when the batch failed), then named.
        FOR i IN 1 .. v_count LOOP
            BEGIN
                PERFORM fhir_outbox.checked_content(p_project, p_resources[i]);
            EXCEPTION WHEN OTHERS THEN
                GET STACKED DIAGNOSTICS v_state = RETURNED_SQLSTATE, v_message = MESSAGE_TEXT,
                                        v_detail = PG_EXCEPTION_DETAIL;
                RAISE EXCEPTION 'resource % of %: %', i, v_count, v_message
                    USING ERRCODE = v_state, DETAIL = v_detail;
            END;
        END LOOP;
        RAISE;
    END;
    IF v_count > 0 THEN
        PERFORM fhir_outbox.held_project(p_project);
    END IF;
    RETURN QUERY
    WITH stamped AS MATERIALIZED (
        SELECT c.n, c.type, c.id, fhir_outbox.stamped_with(c.doc, c.id, v_meta) AS doc
        FROM (SELECT u.n::integer AS n, u.doc ->> 'resourceType' AS type,
                     fhir_outbox.uuid_v7(v_at)::text AS id, u.doc
              FROM unnest(v_checked) WITH ORDINALITY AS u(doc, n)) c),
    resources AS (
        INSERT INTO fhir_outbox.resource
            (project_id, resource_type, id, version_id, live_version_id, deleted, last_updated)
        SELECT p_project, s.type, s.id, 1, 1, false, v_at FROM stamped s),
    versions AS (
        INSERT INTO fhir_outbox.resource_version
            (project_id, resource_type, id, version_id, deleted, content, last_updated, author)
        SELECT p_project, s.type, s.id, 1, false, s.doc, v_at, p_author FROM stamped s),
    -- AuditEvents never trigger subscriptions (as in write_version).
    changes AS (
        INSERT INTO fhir_outbox.outbox
            (project_id, resource_type, resource_id, version_id, previous_version_id, interaction,
             changed_at, request_id, trace_id)
        SELECT p_project, s.type, s.id, 1, NULL, 'create', v_at, v_ctx.request_id, v_ctx.trace_id
        FROM stamped s WHERE s.type <> 'AuditEvent' ORDER BY s.n),
    -- Dispatchers reload a project's subscriptions when its epoch moves (as in write_version).
    epoch AS (
        UPDATE fhir_outbox.project SET subscription_epoch = subscription_epoch + 1
        WHERE id = p_project AND EXISTS (SELECT 1 FROM stamped s WHERE s.type = 'Subscription'))
    SELECT s.n, 'created'::text, s.doc, 1::bigint FROM stamped s ORDER BY s.n;
END
$$;

--
-- Name: current_delivery_lane(); Type: FUNCTION; Schema: fhir_outbox; Owner: -
--

CREATE FUNCTION fhir_outbox.current_delivery_lane() RETURNS smallint
    LANGUAGE sql STABLE
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
    SELECT current FROM fhir_outbox.delivery_lane
$$;

--
-- Name: delete_resource(uuid, text, text, text, text, text); Type: FUNCTION; Schema: fhir_outbox; Owner: -
--

CREATE FUNCTION fhir_outbox.delete_resource(p_project uuid, p_resource_type text, p_id text, p_author text DEFAULT NULL::text, p_request_id text DEFAULT NULL::text, p_trace_id text DEFAULT NULL::text, OUT outcome text, OUT version_id bigint) RETURNS record
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
    v_ctx     record := fhir_outbox.checked_context(p_request_id, p_trace_id);
    v_current record;
    v_at      timestamptz;
BEGIN
    SELECT r.version_id, r.deleted INTO v_current
    FROM fhir_outbox.resource r
    WHERE r.project_id = p_project AND r.resource_type = p_resource_type AND r.id = p_id
    FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION '%/% not found', left(p_resource_type, 100), left(p_id, 100) USING ERRCODE = 'OB008';
    END IF;
    IF v_current.deleted THEN
        outcome := 'already_deleted';
        version_id := v_current.version_id;
        RETURN;
    END IF;
    version_id := v_current.version_id + 1;
    v_at := clock_timestamp();
    UPDATE fhir_outbox.resource r
    SET version_id = delete_resource.version_id, deleted = true, last_updated = v_at
    WHERE r.project_id = p_project AND r.resource_type = p_resource_type AND r.id = p_id;
    PERFORM fhir_outbox.write_version(p_project, p_resource_type, p_id, delete_resource.version_id,
                                      v_current.version_id, 'delete', NULL, v_at, p_author,
                                      v_ctx.request_id, v_ctx.trace_id);
    outcome := 'deleted';
END
$$;

--
-- Name: drop_history_partitions(text, timestamp with time zone); Type: FUNCTION; Schema: fhir_outbox; Owner: -
--

CREATE FUNCTION fhir_outbox.drop_history_partitions(p_table text, p_before timestamp with time zone) RETURNS TABLE(partition text, rows bigint)
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
    v_partition record;
BEGIN
    IF p_table IS NULL OR p_table NOT IN ('finished_delivery', 'delivery_attempt', 'audit_event') THEN
        RAISE EXCEPTION '"%" is not a history table', p_table USING ERRCODE = 'OB001';
    END IF;
    PERFORM pg_advisory_xact_lock(hashtext('fhir_outbox.history_partitions'));
    FOR v_partition IN
        SELECT c.relname,
               (substring(pg_get_expr(c.relpartbound, c.oid) FROM 'TO \(''([^'']+)''\)'))::timestamptz AS upper_bound
        FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
        WHERE i.inhparent = ('fhir_outbox.' || p_table)::regclass
        ORDER BY 2
    LOOP
        CONTINUE WHEN v_partition.upper_bound IS NULL OR v_partition.upper_bound > p_before;
        BEGIN
            SET LOCAL lock_timeout = '1s';
            SELECT CASE WHEN c.reltuples >= 0 THEN c.reltuples::bigint END INTO rows
            FROM pg_class c WHERE c.oid = ('fhir_outbox.' || v_partition.relname)::regclass;
            IF rows IS NULL THEN
                EXECUTE format('SELECT count(*) FROM fhir_outbox.%I', v_partition.relname) INTO rows;
            END IF;
            EXECUTE format('DROP TABLE fhir_outbox.%I', v_partition.relname);
            partition := v_partition.relname;
            RETURN NEXT;
        EXCEPTION WHEN lock_not_available THEN
            RAISE WARNING 'retention skipped partition % this pass: it is in use', v_partition.relname;
        END;
    END LOOP;
END
$$;

--
-- Name: endpoint_origin(text); Type: FUNCTION; Schema: fhir_outbox; Owner: -
--

CREATE FUNCTION fhir_outbox.endpoint_origin(endpoint text) RETURNS text
    LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE
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

--
-- Name: ensure_history_partitions(integer); Type: FUNCTION; Schema: fhir_outbox; Owner: -
--

CREATE FUNCTION fhir_outbox.ensure_history_partitions(p_days_ahead integer DEFAULT 7) RETURNS SETOF text
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
    v_table text;
    v_day date;
    v_name text;
    v_today date := (now() AT TIME ZONE 'UTC')::date;
BEGIN
    IF p_days_ahead IS NULL OR p_days_ahead < 1 OR p_days_ahead > 366 THEN
        RAISE EXCEPTION 'days ahead must be between 1 and 366, not %', p_days_ahead USING ERRCODE = 'OB001';
    END IF;
    -- One maintainer at a time; the others find the work done.
    PERFORM pg_advisory_xact_lock(hashtext('fhir_outbox.history_partitions'));
    FOREACH v_table IN ARRAY ARRAY['finished_delivery', 'delivery_attempt', 'audit_event'] LOOP
        FOR v_day IN SELECT d::date FROM generate_series(v_today, v_today + p_days_ahead, interval '1 day') d LOOP
            v_name := v_table || '_' || to_char(v_day, 'YYYYMMDD');
            CONTINUE WHEN to_regclass('fhir_outbox.' || v_name) IS NOT NULL;
            -- A range another partition already covers (the `_before` one, on the migration's day).
            CONTINUE WHEN EXISTS (
                SELECT 1 FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
                WHERE i.inhparent = ('fhir_outbox.' || v_table)::regclass
                  AND pg_get_expr(c.relpartbound, c.oid) LIKE '%MINVALUE%'
                  AND (substring(pg_get_expr(c.relpartbound, c.oid) FROM 'TO \(''([^'']+)''\)'))::timestamptz
                      > (v_day::timestamp AT TIME ZONE 'UTC'));
            EXECUTE format('CREATE TABLE fhir_outbox.%I (LIKE fhir_outbox.%I INCLUDING DEFAULTS INCLUDING CONSTRAINTS)',
                           v_name, v_table);
            EXECUTE format('ALTER TABLE fhir_outbox.%I ATTACH PARTITION fhir_outbox.%I FOR VALUES FROM (%L) TO (%L)',
                           v_table, v_name,
                           v_day::timestamp AT TIME ZONE 'UTC', (v_day + 1)::timestamp AT TIME ZONE 'UTC');
            RETURN NEXT v_name;
        END LOOP;
    END LOOP;
END
$$;

--
-- Name: forbid_version_update(); Type: FUNCTION; Schema: fhir_outbox; Owner: -
--

CREATE FUNCTION fhir_outbox.forbid_version_update() RETURNS trigger
    LANGUAGE plpgsql
    AS $$
BEGIN
    RAISE EXCEPTION 'resource versions are immutable (%/% version %)', OLD.resource_type, OLD.id, OLD.version_id
        USING ERRCODE = 'OB011';
END
$$;

--
-- Name: handshake_finished(); Type: FUNCTION; Schema: fhir_outbox; Owner: -
--

CREATE FUNCTION fhir_outbox.handshake_finished() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
    v_current record;
    v_status  text;
    v_message text;
BEGIN
    v_status := CASE NEW.state WHEN 'succeeded' THEN 'active' WHEN 'failed' THEN 'error' END;
    IF v_status IS NULL THEN
        RETURN NULL;
    END IF;
    BEGIN
        SELECT r.version_id, v.content INTO v_current
        FROM fhir_outbox.resource r
        JOIN fhir_outbox.resource_version v USING (project_id, resource_type, id, version_id)
        WHERE r.project_id = NEW.project_id AND r.resource_type = 'Subscription'
          AND r.id = NEW.subscription_id AND NOT r.deleted
        FOR UPDATE OF r;
        IF FOUND AND v_current.content ->> 'status' = 'requested' THEN
            PERFORM fhir_outbox.update_resource(
                NEW.project_id, 'Subscription', NEW.subscription_id,
                jsonb_set(v_current.content, '{status}', to_jsonb(v_status)),
                v_current.version_id, 'fhir-outbox', NEW.request_id, NEW.trace_id);
        END IF;
    EXCEPTION WHEN OTHERS THEN
        v_message := format('its handshake %s, but its status could not be set to %s: %s',
                            NEW.state, v_status, SQLERRM);
        RAISE WARNING 'fhir-outbox: Subscription/%: %', NEW.subscription_id, v_message;
        INSERT INTO fhir_outbox.subscription_issue
            (project_id, subscription_id, subscription_version, kind, message)
        SELECT r.project_id, r.id, r.version_id, 'status_update_failed', v_message
        FROM fhir_outbox.resource r
        WHERE r.project_id = NEW.project_id AND r.resource_type = 'Subscription'
          AND r.id = NEW.subscription_id
        ON CONFLICT (project_id, subscription_id, subscription_version, kind, message)
        DO UPDATE SET occurrences = fhir_outbox.subscription_issue.occurrences + 1, last_seen = now();
    END;
    RETURN NULL;
END
$$;

--
-- Name: heartbeat_period(jsonb); Type: FUNCTION; Schema: fhir_outbox; Owner: -
--

CREATE FUNCTION fhir_outbox.heartbeat_period(p_subscription jsonb) RETURNS interval
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
    SELECT CASE WHEN seconds BETWEEN 1 AND 2147483647 AND seconds = trunc(seconds)
                THEN make_interval(secs => seconds::double precision)
           END
    -- A CASE, not an AND, so that only a number is ever cast.
    FROM (SELECT CASE WHEN jsonb_typeof(e -> 'valueUnsignedInt') = 'number'
                      THEN (e ->> 'valueUnsignedInt')::numeric
                 END AS seconds
          FROM jsonb_array_elements(
                   CASE WHEN jsonb_typeof(p_subscription #> '{channel,extension}') = 'array'
                        THEN p_subscription #> '{channel,extension}' ELSE '[]' END)
               WITH ORDINALITY AS x(e, n)
          WHERE e ->> 'url' = 'http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/backport-heartbeat-period'
          ORDER BY n
          LIMIT 1) first
$$;

--
-- Name: held_project(uuid); Type: FUNCTION; Schema: fhir_outbox; Owner: -
--

CREATE FUNCTION fhir_outbox.held_project(p_project uuid) RETURNS void
    LANGUAGE plpgsql
    AS $$
BEGIN
    PERFORM FROM fhir_outbox.project WHERE id = p_project FOR KEY SHARE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'unknown project %', coalesce(p_project::text, 'NULL') USING ERRCODE = 'OB005';
    END IF;
END
$$;

--
-- Name: is_subscription_topic(jsonb); Type: FUNCTION; Schema: fhir_outbox; Owner: -
--

CREATE FUNCTION fhir_outbox.is_subscription_topic(p_content jsonb) RETURNS boolean
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    AS $$
    SELECT coalesce(p_content @> '{"code": {"coding": [{"system": "http://hl7.org/fhir/fhir-types", "code": "SubscriptionTopic"}]}}', false)
$$;

--
-- Name: project_kept_while_it_has_resources(); Type: FUNCTION; Schema: fhir_outbox; Owner: -
--

CREATE FUNCTION fhir_outbox.project_kept_while_it_has_resources() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
BEGIN
    IF TG_OP = 'TRUNCATE' THEN
        IF EXISTS (SELECT FROM fhir_outbox.resource) THEN
            RAISE EXCEPTION 'cannot truncate fhir_outbox.project: resources still belong to projects'
                USING ERRCODE = '23503';
        END IF;
        RETURN NULL;
    END IF;
    IF TG_OP = 'UPDATE' AND NEW.id = OLD.id THEN
        RETURN NEW;
    END IF;
    IF current_setting('transaction_isolation') <> 'read committed' THEN
        RAISE EXCEPTION 'project % can be deleted or given another id only in a READ COMMITTED transaction (this one is %)',
            OLD.id, upper(current_setting('transaction_isolation'))
            USING ERRCODE = '0A000';
    END IF;
    IF EXISTS (SELECT FROM fhir_outbox.resource WHERE project_id = OLD.id) THEN
        RAISE EXCEPTION 'project % still has resources', OLD.id USING ERRCODE = '23503';
    END IF;
    RETURN CASE WHEN TG_OP = 'DELETE' THEN OLD ELSE NEW END;
END
$$;

--
-- Name: queue_heartbeats(); Type: FUNCTION; Schema: fhir_outbox; Owner: -
--

CREATE FUNCTION fhir_outbox.queue_heartbeats() RETURNS integer
    LANGUAGE plpgsql
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
    v_projects      uuid[];
    v_subscriptions text[];
    v_versions      bigint[];
    v_queued        integer;
BEGIN
    IF NOT pg_try_advisory_xact_lock(hashtext('fhir_outbox.heartbeats')) THEN
        RETURN 0;
    END IF;
    -- What is due first, read only: the writes below (and their table locks) happen only when a
    -- heartbeat is due, not at every call.
    SELECT array_agg(h.project_id ORDER BY h.project_id, h.subscription_id),
           array_agg(h.subscription_id ORDER BY h.project_id, h.subscription_id),
           array_agg(h.version_id ORDER BY h.project_id, h.subscription_id)
    INTO v_projects, v_subscriptions, v_versions
    FROM fhir_outbox.subscription_heartbeat h
    LEFT JOIN fhir_outbox.subscription_event_count c
           ON c.project_id = h.project_id AND c.subscription_id = h.subscription_id
    WHERE greatest(c.last_notification_at, h.last_updated) <= now() - h.period
      AND NOT EXISTS (SELECT 1 FROM fhir_outbox.subscription_pause p
                      WHERE p.project_id = h.project_id AND p.subscription_id = h.subscription_id)
      AND NOT EXISTS (SELECT 1 FROM fhir_outbox.unfinished_delivery d
                      WHERE d.project_id = h.project_id AND d.subscription_id = h.subscription_id
                        AND d.notification = 'heartbeat');
    IF v_projects IS NULL THEN
        RETURN 0;
    END IF;
    WITH due AS (
        SELECT * FROM unnest(v_projects, v_subscriptions, v_versions) AS due(project_id, id, version_id)),
    counted AS (
        INSERT INTO fhir_outbox.subscription_event_count AS c (project_id, subscription_id)
        SELECT project_id, id FROM due
        ON CONFLICT (project_id, subscription_id) DO UPDATE SET last_notification_at = now()
        RETURNING c.project_id, c.subscription_id, c.events_since_start)
    INSERT INTO fhir_outbox.unfinished_delivery
        (project_id, subscription_id, outbox_seq, resource_project_id, resource_type, resource_id,
         version_id, previous_version_id, interaction, changed_at, request_id, trace_id, matched_at,
         notification, event_number, lane)
    SELECT d.project_id, d.id, 0, d.project_id, 'Subscription', d.id, d.version_id, NULL, 'update',
           now(), gen_random_uuid()::text, gen_random_uuid()::text, now(),
           'heartbeat', c.events_since_start, (SELECT current FROM fhir_outbox.delivery_lane)
    FROM due d JOIN counted c ON c.project_id = d.project_id AND c.subscription_id = d.id;
    GET DIAGNOSTICS v_queued = ROW_COUNT;
    PERFORM pg_notify('fhir_outbox_delivery', '');
    RETURN v_queued;
END
$$;

--
-- Name: read_resource(uuid, text, text); Type: FUNCTION; Schema: fhir_outbox; Owner: -
--

CREATE FUNCTION fhir_outbox.read_resource(p_project uuid, p_resource_type text, p_id text) RETURNS jsonb
    LANGUAGE plpgsql STABLE SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
    v_current record;
    v_audit jsonb;
BEGIN
    SELECT r.deleted, v.content INTO v_current
    FROM fhir_outbox.resource r
    JOIN fhir_outbox.resource_version v USING (project_id, resource_type, id, version_id)
    WHERE r.project_id = p_project AND r.resource_type = p_resource_type AND r.id = p_id;
    IF NOT FOUND THEN
        IF p_resource_type = 'AuditEvent' THEN
            v_audit := fhir_outbox.stored_audit_event(p_project, p_id);
            IF v_audit IS NOT NULL THEN
                RETURN v_audit;
            END IF;
        END IF;
        RAISE EXCEPTION '%/% not found', left(p_resource_type, 100), left(p_id, 100) USING ERRCODE = 'OB008';
    END IF;
    IF v_current.deleted THEN
        RAISE EXCEPTION '%/% is deleted', p_resource_type, p_id USING ERRCODE = 'OB009';
    END IF;
    RETURN v_current.content;
END
$$;

--
-- Name: record_endpoint_results(uuid[], text[], boolean[], integer[], text[], boolean[], integer, double precision[], integer, integer); Type: FUNCTION; Schema: fhir_outbox; Owner: -
--

CREATE FUNCTION fhir_outbox.record_endpoint_results(p_projects uuid[], p_endpoints text[], p_healthy boolean[], p_failures integer[], p_last_failures text[], p_fast boolean[], p_threshold integer, p_cool_downs double precision[], p_base integer, p_max integer) RETURNS TABLE(project_id uuid, endpoint text, from_state text, to_state text, consecutive_failures integer, next_probe_at timestamp with time zone)
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

--
-- Name: reset_endpoint(uuid, text); Type: FUNCTION; Schema: fhir_outbox; Owner: -
--

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

--
-- Name: resource_history(uuid, text, text); Type: FUNCTION; Schema: fhir_outbox; Owner: -
--

CREATE FUNCTION fhir_outbox.resource_history(p_project uuid, p_resource_type text, p_id text) RETURNS TABLE(version_id bigint, deleted boolean, last_updated timestamp with time zone, author text, resource jsonb)
    LANGUAGE sql STABLE SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
    SELECT v.version_id, v.deleted, v.last_updated, v.author, v.content
    FROM fhir_outbox.resource_version v
    WHERE v.project_id = p_project AND v.resource_type = p_resource_type AND v.id = p_id
    UNION ALL
    SELECT 1, false, (a.content #>> '{meta,lastUpdated}')::timestamptz, NULL, a.content
    FROM (SELECT fhir_outbox.stored_audit_event(p_project, p_id) AS content) a
    WHERE p_resource_type = 'AuditEvent' AND a.content IS NOT NULL
    ORDER BY 1 DESC
$$;

--
-- Name: rotate_delivery_lanes(double precision, bigint, integer, integer, double precision); Type: FUNCTION; Schema: fhir_outbox; Owner: -
--

CREATE FUNCTION fhir_outbox.rotate_delivery_lanes(p_min_seconds double precision DEFAULT 10, p_min_dead bigint DEFAULT 10000, p_max_moves integer DEFAULT 1000, p_max_moves_held integer DEFAULT 10000, p_held_seconds double precision DEFAULT 30, OUT moved bigint, OUT truncated boolean, OUT switched boolean, OUT horizon_held boolean) RETURNS record
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
    v_current smallint;
    v_switched_at timestamptz;
    v_switched_xid xid8;
    v_seen_xmin xid;
    v_seen_since timestamptz;
    v_oldest xid;
    v_other smallint;
    v_other_table text;
    v_left bigint;
    v_dead bigint;
    v_live bigint;
    v_cursor record;
BEGIN
    moved := 0;
    truncated := false;
    switched := false;
    horizon_held := false;
    IF NOT pg_try_advisory_xact_lock(hashtext('fhir_outbox.delivery_lanes')) THEN
        RETURN;
    END IF;
    SELECT current, switched_at, switched_xid, oldest_xmin, oldest_xmin_since
    INTO v_current, v_switched_at, v_switched_xid, v_seen_xmin, v_seen_since
    FROM fhir_outbox.delivery_lane;
    -- Backends of this database hold its horizon, and so do those of none (a replica's feedback);
    -- autovacuum's VACUUM does not hold it back for VACUUM.
    SELECT a.backend_xmin INTO v_oldest FROM pg_stat_activity a
    WHERE a.backend_xmin IS NOT NULL AND a.pid <> pg_backend_pid()
      AND a.backend_type IS DISTINCT FROM 'autovacuum worker'
      AND (a.datid IS NULL
           OR a.datid = (SELECT oid FROM pg_database WHERE datname = current_database()))
    ORDER BY age(a.backend_xmin) DESC LIMIT 1;
    IF v_oldest IS DISTINCT FROM v_seen_xmin THEN
        UPDATE fhir_outbox.delivery_lane SET oldest_xmin = v_oldest, oldest_xmin_since = now();
    ELSE
        horizon_held := v_oldest IS NOT NULL
            AND now() - v_seen_since >= make_interval(secs => p_held_seconds)
            AND age(v_oldest) > age(v_switched_xid::xid);
    END IF;
    -- Every claim updates the one-row claim cursor, and every claim reads it: under a held
    -- horizon its dead versions pile up too (about one per claim). Kept to a few pages: emptied
    -- and written again under the claim lock, so that no claim sees it empty.
    IF horizon_held AND pg_relation_size('fhir_outbox.claim_cursor') > 65536 THEN
        PERFORM pg_advisory_xact_lock(hashtext('fhir_outbox.delivery_claim'));
        SELECT project_id, subscription_id INTO v_cursor FROM fhir_outbox.claim_cursor;
        IF FOUND THEN
            BEGIN
                PERFORM set_config('lock_timeout', '200ms', true);
                TRUNCATE fhir_outbox.claim_cursor;
                INSERT INTO fhir_outbox.claim_cursor (project_id, subscription_id)
                VALUES (v_cursor.project_id, v_cursor.subscription_id);
            EXCEPTION WHEN lock_not_available THEN
                NULL; -- someone else reads it: next pass
            END;
        END IF;
    END IF;
    v_other := 1 - v_current;
    v_other_table := 'unfinished_delivery_lane' || v_other;
    SELECT count(*) INTO v_left FROM (SELECT 1 FROM fhir_outbox.unfinished_delivery
                                      WHERE lane = v_other AND state = 'pending'
                                      LIMIT p_max_moves + 1) p;
    IF v_left > p_max_moves AND NOT horizon_held THEN
        RETURN;
    END IF;
    IF v_left > 0 THEN
        PERFORM pg_advisory_xact_lock(hashtext('fhir_outbox.delivery_claim'));
    END IF;
    WITH movable AS (
        SELECT id FROM fhir_outbox.unfinished_delivery
        WHERE lane = v_other AND state = 'pending'
        LIMIT CASE WHEN horizon_held THEN greatest(p_max_moves_held, p_max_moves) ELSE p_max_moves END
        FOR UPDATE SKIP LOCKED),
    m AS (
        UPDATE fhir_outbox.unfinished_delivery d SET lane = v_current
        FROM movable WHERE d.id = movable.id AND d.lane = v_other
        RETURNING 1)
    SELECT count(*) INTO moved FROM m;
    IF moved > 0 THEN
        RETURN;
    END IF;
    IF pg_relation_size(('fhir_outbox.' || v_other_table)::regclass) > 0 THEN
        BEGIN
            PERFORM set_config('lock_timeout', '200ms', true);
            EXECUTE format('LOCK TABLE fhir_outbox.%I IN ACCESS EXCLUSIVE MODE', v_other_table);
            IF EXISTS (SELECT 1 FROM fhir_outbox.unfinished_delivery WHERE lane = v_other) THEN
                RETURN;
            END IF;
            EXECUTE format('TRUNCATE fhir_outbox.%I', v_other_table);
            truncated := true;
        EXCEPTION WHEN lock_not_available THEN
            RETURN;
        END;
    END IF;
    SELECT n_dead_tup, n_live_tup INTO v_dead, v_live FROM pg_stat_user_tables
    WHERE relid = ('fhir_outbox.unfinished_delivery_lane' || v_current)::regclass;
    IF v_dead >= p_min_dead AND (horizon_held OR v_dead > v_live)
       AND now() - v_switched_at >= make_interval(secs => p_min_seconds) THEN
        UPDATE fhir_outbox.delivery_lane
        SET current = v_other, switched_at = now(), switched_xid = pg_current_xact_id(),
            switches = switches + 1;
        switched := true;
    END IF;
END
$$;

--
-- Name: server_meta(uuid, bigint, timestamp with time zone, text); Type: FUNCTION; Schema: fhir_outbox; Owner: -
--

CREATE FUNCTION fhir_outbox.server_meta(p_project uuid, p_version bigint, p_at timestamp with time zone, p_author text) RETURNS jsonb
    LANGUAGE sql STABLE
    AS $$
    SELECT jsonb_build_object(
            'versionId', p_version::text,
            'lastUpdated', to_char(p_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"'),
            'project', p_project::text)
        || CASE WHEN p_author IS NULL THEN '{}'::jsonb
                ELSE jsonb_build_object('author', jsonb_build_object('reference', p_author)) END
$$;

--
-- Name: stamped(jsonb, uuid, text, bigint, timestamp with time zone, text); Type: FUNCTION; Schema: fhir_outbox; Owner: -
--

CREATE FUNCTION fhir_outbox.stamped(p_content jsonb, p_project uuid, p_id text, p_version bigint, p_at timestamp with time zone, p_author text) RETURNS jsonb
    LANGUAGE sql STABLE
    AS $$
    SELECT fhir_outbox.stamped_with(p_content, p_id,
                                    fhir_outbox.server_meta(p_project, p_version, p_at, p_author))
$$;

--
-- Name: stamped_with(jsonb, text, jsonb); Type: FUNCTION; Schema: fhir_outbox; Owner: -
--

CREATE FUNCTION fhir_outbox.stamped_with(p_content jsonb, p_id text, p_meta jsonb) RETURNS jsonb
    LANGUAGE sql STABLE
    AS $$
    SELECT p_content || jsonb_build_object('id', p_id, 'meta',
        (coalesce(p_content -> 'meta', '{}'::jsonb) - '{versionId,lastUpdated,project,author}'::text[])
        || p_meta)
$$;

--
-- Name: stored_audit_event(uuid, text); Type: FUNCTION; Schema: fhir_outbox; Owner: -
--

CREATE FUNCTION fhir_outbox.stored_audit_event(p_project uuid, p_id text) RETURNS jsonb
    LANGUAGE sql STABLE
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
    SELECT a.content::jsonb FROM fhir_outbox.audit_event a
    WHERE a.project_id = p_project AND a.id = p_id
      AND (fhir_outbox.uuid_v7_time(p_id) IS NULL
           OR a.recorded_at BETWEEN fhir_outbox.uuid_v7_time(p_id)
                                AND fhir_outbox.uuid_v7_time(p_id) + interval '1 millisecond')
$$;

--
-- Name: strip_empty(jsonb); Type: FUNCTION; Schema: fhir_outbox; Owner: -
--

CREATE FUNCTION fhir_outbox.strip_empty(v jsonb) RETURNS jsonb
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    AS $$
    SELECT CASE jsonb_typeof(v)
        WHEN 'object' THEN (
            SELECT coalesce(jsonb_object_agg(key, stripped), '{}'::jsonb)
            FROM (SELECT key, fhir_outbox.strip_empty(value) AS stripped FROM jsonb_each(v)) members
            WHERE stripped NOT IN ('null'::jsonb, '""'::jsonb, '{}'::jsonb, '[]'::jsonb))
        WHEN 'array' THEN (
            SELECT jsonb_agg(fhir_outbox.strip_empty(value) ORDER BY ordinality)
            FROM jsonb_array_elements(v) WITH ORDINALITY)
        ELSE v
    END
$$;

--
-- Name: subscription_heartbeat_written(); Type: FUNCTION; Schema: fhir_outbox; Owner: -
--

CREATE FUNCTION fhir_outbox.subscription_heartbeat_written() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
    v_period interval;
BEGIN
    IF NEW.content ->> 'status' = 'active' AND NEW.content #>> '{channel,type}' = 'rest-hook' THEN
        v_period := fhir_outbox.heartbeat_period(NEW.content);
    END IF;
    IF v_period IS NULL THEN
        DELETE FROM fhir_outbox.subscription_heartbeat
        WHERE project_id = NEW.project_id AND subscription_id = NEW.id;
    ELSE
        INSERT INTO fhir_outbox.subscription_heartbeat AS h
            (project_id, subscription_id, version_id, last_updated, period)
        VALUES (NEW.project_id, NEW.id, NEW.version_id, NEW.last_updated, v_period)
        ON CONFLICT (project_id, subscription_id) DO UPDATE
        SET version_id = excluded.version_id, last_updated = excluded.last_updated,
            period = excluded.period
        WHERE h.version_id < excluded.version_id;
    END IF;
    RETURN NULL;
END
$$;

--
-- Name: topic_written(); Type: FUNCTION; Schema: fhir_outbox; Owner: -
--

CREATE FUNCTION fhir_outbox.topic_written() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
BEGIN
    IF fhir_outbox.is_subscription_topic(NEW.content) THEN
        INSERT INTO fhir_outbox.subscription_topic (project_id, id)
        VALUES (NEW.project_id, NEW.id)
        ON CONFLICT DO NOTHING;
    ELSE
        DELETE FROM fhir_outbox.subscription_topic
        WHERE project_id = NEW.project_id AND id = NEW.id;
        IF NOT FOUND THEN
            RETURN NULL;
        END IF;
    END IF;
    UPDATE fhir_outbox.project SET subscription_epoch = subscription_epoch + 1
    WHERE id = NEW.project_id;
    RETURN NULL;
END
$$;

--
-- Name: update_resource(uuid, text, text, jsonb, bigint, text, text, text); Type: FUNCTION; Schema: fhir_outbox; Owner: -
--

CREATE FUNCTION fhir_outbox.update_resource(p_project uuid, p_resource_type text, p_id text, p_resource jsonb, p_if_match bigint DEFAULT NULL::bigint, p_author text DEFAULT NULL::text, p_request_id text DEFAULT NULL::text, p_trace_id text DEFAULT NULL::text, OUT outcome text, OUT resource jsonb, OUT version_id bigint) RETURNS record
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $_$
DECLARE
    v_content jsonb := fhir_outbox.checked_content(p_project, p_resource);
    v_ctx     record := fhir_outbox.checked_context(p_request_id, p_trace_id);
    v_current record;
    v_old     jsonb;
    v_at      timestamptz;
    v_version bigint;
    v_previous bigint;
BEGIN
    IF v_content ->> 'resourceType' <> p_resource_type THEN
        RAISE EXCEPTION 'resourceType "%" in the body does not match "%"', v_content ->> 'resourceType',
            left(p_resource_type, 100) USING ERRCODE = 'OB003';
    END IF;
    IF p_id IS NULL OR p_id !~ '^[A-Za-z0-9\-\.]{1,64}$' THEN
        RAISE EXCEPTION 'invalid resource id "%": 1 to 64 of A-Z a-z 0-9 - .', left(p_id, 100)
            USING ERRCODE = 'OB004';
    END IF;
    IF NOT v_content ? 'id' THEN
        RAISE EXCEPTION 'resource has no id; an update must carry id "%"', p_id USING ERRCODE = 'OB003';
    END IF;
    IF v_content ->> 'id' IS DISTINCT FROM p_id THEN
        RAISE EXCEPTION 'resource id "%" does not match the id "%" it is written to',
            left(v_content ->> 'id', 100), p_id USING ERRCODE = 'OB003';
    END IF;

    -- Lock the resource row; create it if it does not exist yet. A concurrent create of the same id makes
    -- the insert do nothing, and the next lock attempt then waits for that transaction.
    LOOP
        SELECT r.version_id, r.live_version_id, r.deleted INTO v_current
        FROM fhir_outbox.resource r
        WHERE r.project_id = p_project AND r.resource_type = p_resource_type AND r.id = p_id
        FOR UPDATE;
        EXIT WHEN FOUND;
        IF p_if_match IS NOT NULL THEN
            RAISE EXCEPTION 'version conflict on %/%: If-Match % but the resource does not exist',
                p_resource_type, p_id, p_if_match USING ERRCODE = 'OB007', DETAIL = '';
        END IF;
        PERFORM fhir_outbox.held_project(p_project);
        v_at := clock_timestamp();
        INSERT INTO fhir_outbox.resource (project_id, resource_type, id, version_id, live_version_id, deleted, last_updated)
        VALUES (p_project, p_resource_type, p_id, 1, 1, false, v_at)
        ON CONFLICT DO NOTHING;
        IF FOUND THEN
            resource := fhir_outbox.stamped(v_content, p_project, p_id, 1, v_at, p_author);
            PERFORM fhir_outbox.write_version(p_project, p_resource_type, p_id, 1, NULL, 'update', resource,
                                              v_at, p_author, v_ctx.request_id, v_ctx.trace_id);
            outcome := 'created';
            version_id := 1;
            RETURN;
        END IF;
    END LOOP;

    IF p_if_match IS NOT NULL AND p_if_match <> v_current.version_id THEN
        RAISE EXCEPTION 'version conflict on %/%: If-Match % but the current version is %',
            p_resource_type, p_id, p_if_match, v_current.version_id
            USING ERRCODE = 'OB007', DETAIL = v_current.version_id::text;
    END IF;

    IF NOT v_current.deleted THEN
        SELECT v.content INTO v_old FROM fhir_outbox.resource_version v
        WHERE v.project_id = p_project AND v.resource_type = p_resource_type AND v.id = p_id
          AND v.version_id = v_current.version_id;
        IF fhir_outbox.without_server_meta(v_old) = fhir_outbox.without_server_meta(v_content) THEN
            outcome := 'unchanged';
            resource := v_old;
            version_id := v_current.version_id;
            RETURN;
        END IF;
        v_previous := v_current.version_id;
    END IF;

    v_version := v_current.version_id + 1;
    v_at := clock_timestamp();
    resource := fhir_outbox.stamped(v_content, p_project, p_id, v_version, v_at, p_author);
    UPDATE fhir_outbox.resource r
    SET version_id = v_version, live_version_id = v_version, deleted = false, last_updated = v_at
    WHERE r.project_id = p_project AND r.resource_type = p_resource_type AND r.id = p_id;
    PERFORM fhir_outbox.write_version(p_project, p_resource_type, p_id, v_version, v_previous, 'update',
                                      resource, v_at, p_author, v_ctx.request_id, v_ctx.trace_id);
    outcome := CASE WHEN v_current.deleted THEN 'restored' ELSE 'updated' END;
    version_id := v_version;
END
$_$;

--
-- Name: uuid_v7(timestamp with time zone); Type: FUNCTION; Schema: fhir_outbox; Owner: -
--

CREATE FUNCTION fhir_outbox.uuid_v7(p_at timestamp with time zone) RETURNS uuid
    LANGUAGE sql PARALLEL SAFE
    AS $$
    -- A random (v4) UUID whose first 48 bits become the time in milliseconds and whose version
    -- nibble becomes 7 (bits 52 and 53 set on top of v4's 0100).
    SELECT encode(set_bit(set_bit(overlay(uuid_send(gen_random_uuid())
                                          PLACING substring(int8send(floor(extract(epoch FROM p_at) * 1000)::bigint) FROM 3)
                                          FROM 1 FOR 6), 52, 1), 53, 1), 'hex')::uuid
$$;

--
-- Name: uuid_v7_time(text); Type: FUNCTION; Schema: fhir_outbox; Owner: -
--

CREATE FUNCTION fhir_outbox.uuid_v7_time(p_id text) RETURNS timestamp with time zone
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    AS $_$
    SELECT CASE WHEN p_id ~* '^[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$'
                THEN to_timestamp(('x' || lpad(left(replace(p_id, '-', ''), 12), 16, '0'))::bit(64)::bigint / 1000.0)
           END
$_$;

--
-- Name: vread_resource(uuid, text, text, bigint); Type: FUNCTION; Schema: fhir_outbox; Owner: -
--

CREATE FUNCTION fhir_outbox.vread_resource(p_project uuid, p_resource_type text, p_id text, p_version_id bigint) RETURNS jsonb
    LANGUAGE plpgsql STABLE SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
    v_version record;
    v_audit jsonb;
BEGIN
    SELECT v.deleted, v.content INTO v_version
    FROM fhir_outbox.resource_version v
    WHERE v.project_id = p_project AND v.resource_type = p_resource_type AND v.id = p_id
      AND v.version_id = p_version_id;
    IF NOT FOUND THEN
        IF p_resource_type = 'AuditEvent' AND p_version_id = 1 THEN
            v_audit := fhir_outbox.stored_audit_event(p_project, p_id);
            IF v_audit IS NOT NULL THEN
                RETURN v_audit;
            END IF;
        END IF;
        RAISE EXCEPTION '%/%/_history/% not found', left(p_resource_type, 100), left(p_id, 100), p_version_id
            USING ERRCODE = 'OB008';
    END IF;
    IF v_version.deleted THEN
        RAISE EXCEPTION '%/%/_history/% is a deletion', p_resource_type, p_id, p_version_id
            USING ERRCODE = 'OB009';
    END IF;
    RETURN v_version.content;
END
$$;

--
-- Name: wake_waiting_dispatchers(); Type: FUNCTION; Schema: fhir_outbox; Owner: -
--

CREATE FUNCTION fhir_outbox.wake_waiting_dispatchers() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
    v_taken bigint;
BEGIN
    -- Almost always no dispatcher waits (one only waits when it has drained the outbox): a plain
    -- look first, which sees what the UPDATE's scan would see.
    IF NOT EXISTS (SELECT FROM fhir_outbox.dispatcher_waiting WHERE waiting) THEN
        RETURN NULL;
    END IF;
    IF coalesce(current_query(), '') ~* '\mprepare\s+transaction\M' THEN
        RETURN NULL;
    END IF;
    IF current_setting('transaction_isolation') IN ('read committed', 'read uncommitted') THEN
        WITH taken AS (
            SELECT listener FROM fhir_outbox.dispatcher_waiting WHERE waiting FOR UPDATE SKIP LOCKED)
        UPDATE fhir_outbox.dispatcher_waiting w SET waiting = false
        FROM taken WHERE w.listener = taken.listener;
        GET DIAGNOSTICS v_taken = ROW_COUNT;
    ELSE
        -- Locking a row that was changed after this transaction's snapshot would fail the
        -- writer's COMMIT with a serialisation error: only look.
        SELECT count(*) INTO v_taken FROM fhir_outbox.dispatcher_waiting WHERE waiting;
    END IF;
    IF v_taken > 0 THEN
        PERFORM pg_notify('fhir_outbox_change', '');
    END IF;
    RETURN NULL;
END
$$;

--
-- Name: without_server_meta(jsonb); Type: FUNCTION; Schema: fhir_outbox; Owner: -
--

CREATE FUNCTION fhir_outbox.without_server_meta(r jsonb) RETURNS jsonb
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    AS $$
    SELECT CASE WHEN coalesce(r -> 'meta', '{}'::jsonb)
                     - '{versionId,lastUpdated,project,author}'::text[] = '{}'::jsonb
                THEN r - 'meta'
                ELSE jsonb_set(r, '{meta}', coalesce(r -> 'meta', '{}'::jsonb)
                                            - '{versionId,lastUpdated,project,author}'::text[])
           END
$$;

--
-- Name: write_delivery_view(); Type: FUNCTION; Schema: fhir_outbox; Owner: -
--

CREATE FUNCTION fhir_outbox.write_delivery_view() RETURNS trigger
    LANGUAGE plpgsql
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
    v_unfinished boolean;
BEGIN
    IF TG_OP IN ('UPDATE', 'DELETE') THEN
        IF OLD.state IN ('pending', 'in_flight') THEN
            DELETE FROM fhir_outbox.unfinished_delivery WHERE id = OLD.id;
        ELSE
            DELETE FROM fhir_outbox.finished_delivery WHERE id = OLD.id AND finished_at = OLD.finished_at;
        END IF;
        IF TG_OP = 'DELETE' THEN
            RETURN OLD;
        END IF;
    END IF;
    NEW.id := coalesce(NEW.id, nextval('fhir_outbox.delivery_id_seq'));
    NEW.webhook_id := coalesce(NEW.webhook_id, gen_random_uuid());
    NEW.state := coalesce(NEW.state, 'pending');
    NEW.attempts := coalesce(NEW.attempts, 0);
    NEW.claims := coalesce(NEW.claims, 0);
    NEW.preamble_failures := coalesce(NEW.preamble_failures, 0);
    NEW.replay := coalesce(NEW.replay, false);
    NEW.next_attempt_at := coalesce(NEW.next_attempt_at, now());
    v_unfinished := NEW.state IN ('pending', 'in_flight');
    IF v_unfinished THEN
        NEW.finished_at := NULL;
        INSERT INTO fhir_outbox.unfinished_delivery
            (id, webhook_id, project_id, subscription_id, outbox_seq, resource_project_id,
             resource_type, resource_id, version_id, previous_version_id, interaction, changed_at,
             request_id, trace_id, matched_at, state, attempts, next_attempt_at, reason, lease_token,
             lease_expires_at, claims, preamble_failures, last_status, replay, notification,
             event_number)
        VALUES (NEW.id, NEW.webhook_id, NEW.project_id, NEW.subscription_id, NEW.outbox_seq,
                NEW.resource_project_id, NEW.resource_type, NEW.resource_id, NEW.version_id,
                NEW.previous_version_id, NEW.interaction, NEW.changed_at, NEW.request_id,
                NEW.trace_id, NEW.matched_at, NEW.state, NEW.attempts, NEW.next_attempt_at,
                NEW.reason, NEW.lease_token, NEW.lease_expires_at, NEW.claims,
                NEW.preamble_failures, NEW.last_status, NEW.replay, NEW.notification,
                NEW.event_number);
    ELSE
        NEW.finished_at := coalesce(NEW.finished_at, now());
        NEW.lease_token := NULL;
        NEW.lease_expires_at := NULL;
        INSERT INTO fhir_outbox.finished_delivery
            (id, webhook_id, project_id, subscription_id, outbox_seq, resource_project_id,
             resource_type, resource_id, version_id, previous_version_id, interaction, changed_at,
             request_id, trace_id, matched_at, state, attempts, next_attempt_at, finished_at, reason,
             claims, preamble_failures, last_status, replay, notification, event_number)
        VALUES (NEW.id, NEW.webhook_id, NEW.project_id, NEW.subscription_id, NEW.outbox_seq,
                NEW.resource_project_id, NEW.resource_type, NEW.resource_id, NEW.version_id,
                NEW.previous_version_id, NEW.interaction, NEW.changed_at, NEW.request_id,
                NEW.trace_id, NEW.matched_at, NEW.state, NEW.attempts, NEW.next_attempt_at,
                NEW.finished_at, NEW.reason, NEW.claims, NEW.preamble_failures, NEW.last_status,
                NEW.replay, NEW.notification, NEW.event_number);
    END IF;
    RETURN NEW;
END
$$;

--
-- Name: write_version(uuid, text, text, bigint, bigint, text, jsonb, timestamp with time zone, text, text, text); Type: FUNCTION; Schema: fhir_outbox; Owner: -
--

CREATE FUNCTION fhir_outbox.write_version(p_project uuid, p_type text, p_id text, p_version bigint, p_previous bigint, p_interaction text, p_content jsonb, p_at timestamp with time zone, p_author text, p_request_id text, p_trace_id text) RETURNS void
    LANGUAGE plpgsql
    AS $$
BEGIN
    INSERT INTO fhir_outbox.resource_version
        (project_id, resource_type, id, version_id, deleted, content, last_updated, author)
    VALUES (p_project, p_type, p_id, p_version, p_content IS NULL, p_content, p_at, p_author);
    IF p_type = 'Subscription' THEN
        UPDATE fhir_outbox.project SET subscription_epoch = subscription_epoch + 1 WHERE id = p_project;
    END IF;
    -- AuditEvents never trigger subscriptions (delivery itself writes them, this prevents loops).
    IF p_type <> 'AuditEvent' THEN
        INSERT INTO fhir_outbox.outbox (project_id, resource_type, resource_id, version_id,
                                        previous_version_id, interaction, changed_at, request_id, trace_id)
        VALUES (p_project, p_type, p_id, p_version, p_previous, p_interaction, p_at, p_request_id, p_trace_id);
    END IF;
END
$$;

--
-- Name: audit_event; Type: TABLE; Schema: fhir_outbox; Owner: -
--

CREATE TABLE fhir_outbox.audit_event (
    project_id uuid NOT NULL,
    id text NOT NULL,
    recorded_at timestamp with time zone NOT NULL,
    content json NOT NULL
)
PARTITION BY RANGE (recorded_at);

--
-- Name: claim_cursor; Type: TABLE; Schema: fhir_outbox; Owner: -
--

CREATE UNLOGGED TABLE fhir_outbox.claim_cursor (
    only_row boolean DEFAULT true NOT NULL,
    project_id uuid NOT NULL,
    subscription_id text NOT NULL,
    CONSTRAINT claim_cursor_only_row_check CHECK (only_row)
);

--
-- Name: console_token; Type: TABLE; Schema: fhir_outbox; Owner: -
--

CREATE TABLE fhir_outbox.console_token (
    id uuid DEFAULT gen_random_uuid() NOT NULL,
    name text NOT NULL,
    role text NOT NULL,
    project_id uuid,
    secret_sha256 bytea NOT NULL,
    created_at timestamp with time zone DEFAULT now() NOT NULL,
    revoked_at timestamp with time zone,
    last_used_at timestamp with time zone,
    CONSTRAINT console_token_name_check CHECK (((name <> ''::text) AND (length(name) <= 100))),
    CONSTRAINT console_token_role_check CHECK ((role = ANY (ARRAY['viewer'::text, 'operator'::text])))
);

--
-- Name: unfinished_delivery; Type: TABLE; Schema: fhir_outbox; Owner: -
--

CREATE TABLE fhir_outbox.unfinished_delivery (
    id bigint NOT NULL,
    webhook_id uuid DEFAULT gen_random_uuid() NOT NULL,
    project_id uuid NOT NULL,
    subscription_id text NOT NULL,
    outbox_seq bigint NOT NULL,
    resource_project_id uuid NOT NULL,
    resource_type text NOT NULL,
    resource_id text NOT NULL,
    version_id bigint NOT NULL,
    previous_version_id bigint,
    interaction text NOT NULL,
    changed_at timestamp with time zone NOT NULL,
    request_id text NOT NULL,
    trace_id text NOT NULL,
    matched_at timestamp with time zone NOT NULL,
    state text DEFAULT 'pending'::text NOT NULL,
    attempts integer DEFAULT 0 NOT NULL,
    next_attempt_at timestamp with time zone DEFAULT now() NOT NULL,
    reason text,
    lease_token uuid,
    lease_expires_at timestamp with time zone,
    claims integer DEFAULT 0 NOT NULL,
    preamble_failures integer DEFAULT 0 NOT NULL,
    last_status integer,
    replay boolean DEFAULT false NOT NULL,
    lane smallint DEFAULT fhir_outbox.current_delivery_lane() NOT NULL,
    notification text,
    event_number bigint,
    CONSTRAINT unfinished_delivery_interaction_check CHECK ((interaction = ANY (ARRAY['create'::text, 'update'::text, 'delete'::text]))),
    CONSTRAINT unfinished_delivery_notification_check CHECK ((notification = ANY (ARRAY['handshake'::text, 'heartbeat'::text, 'event-notification'::text]))),
    CONSTRAINT unfinished_delivery_state_check CHECK ((state = ANY (ARRAY['pending'::text, 'in_flight'::text])))
)
PARTITION BY LIST (lane);

--
-- Name: delivery_id_seq; Type: SEQUENCE; Schema: fhir_outbox; Owner: -
--

CREATE SEQUENCE fhir_outbox.delivery_id_seq
    START WITH 1
    INCREMENT BY 1
    NO MINVALUE
    NO MAXVALUE
    CACHE 1;

--
-- Name: delivery_id_seq; Type: SEQUENCE OWNED BY; Schema: fhir_outbox; Owner: -
--

ALTER SEQUENCE fhir_outbox.delivery_id_seq OWNED BY fhir_outbox.unfinished_delivery.id;

--
-- Name: finished_delivery; Type: TABLE; Schema: fhir_outbox; Owner: -
--

CREATE TABLE fhir_outbox.finished_delivery (
    id bigint DEFAULT nextval('fhir_outbox.delivery_id_seq'::regclass) NOT NULL,
    webhook_id uuid DEFAULT gen_random_uuid() NOT NULL,
    project_id uuid NOT NULL,
    subscription_id text NOT NULL,
    outbox_seq bigint NOT NULL,
    resource_project_id uuid NOT NULL,
    resource_type text NOT NULL,
    resource_id text NOT NULL,
    version_id bigint NOT NULL,
    previous_version_id bigint,
    interaction text NOT NULL,
    changed_at timestamp with time zone NOT NULL,
    request_id text NOT NULL,
    trace_id text NOT NULL,
    matched_at timestamp with time zone NOT NULL,
    state text NOT NULL,
    attempts integer DEFAULT 0 NOT NULL,
    next_attempt_at timestamp with time zone DEFAULT now() NOT NULL,
    finished_at timestamp with time zone DEFAULT now() NOT NULL,
    reason text,
    claims integer DEFAULT 0 NOT NULL,
    preamble_failures integer DEFAULT 0 NOT NULL,
    last_status integer,
    replay boolean DEFAULT false NOT NULL,
    notification text,
    event_number bigint,
    CONSTRAINT finished_delivery_interaction_check CHECK ((interaction = ANY (ARRAY['create'::text, 'update'::text, 'delete'::text]))),
    CONSTRAINT finished_delivery_notification_check CHECK ((notification = ANY (ARRAY['handshake'::text, 'heartbeat'::text, 'event-notification'::text]))),
    CONSTRAINT finished_delivery_state_check CHECK ((state = ANY (ARRAY['succeeded'::text, 'skipped'::text, 'failed'::text, 'cancelled'::text])))
)
PARTITION BY RANGE (finished_at);

--
-- Name: delivery; Type: VIEW; Schema: fhir_outbox; Owner: -
--

CREATE VIEW fhir_outbox.delivery AS
 SELECT unfinished_delivery.id,
    unfinished_delivery.webhook_id,
    unfinished_delivery.project_id,
    unfinished_delivery.subscription_id,
    unfinished_delivery.outbox_seq,
    unfinished_delivery.resource_project_id,
    unfinished_delivery.resource_type,
    unfinished_delivery.resource_id,
    unfinished_delivery.version_id,
    unfinished_delivery.previous_version_id,
    unfinished_delivery.interaction,
    unfinished_delivery.changed_at,
    unfinished_delivery.request_id,
    unfinished_delivery.trace_id,
    unfinished_delivery.matched_at,
    unfinished_delivery.state,
    unfinished_delivery.attempts,
    unfinished_delivery.next_attempt_at,
    NULL::timestamp with time zone AS finished_at,
    unfinished_delivery.reason,
    unfinished_delivery.lease_token,
    unfinished_delivery.lease_expires_at,
    unfinished_delivery.claims,
    unfinished_delivery.preamble_failures,
    unfinished_delivery.last_status,
    unfinished_delivery.replay,
    unfinished_delivery.notification,
    unfinished_delivery.event_number
   FROM fhir_outbox.unfinished_delivery
UNION ALL
 SELECT finished_delivery.id,
    finished_delivery.webhook_id,
    finished_delivery.project_id,
    finished_delivery.subscription_id,
    finished_delivery.outbox_seq,
    finished_delivery.resource_project_id,
    finished_delivery.resource_type,
    finished_delivery.resource_id,
    finished_delivery.version_id,
    finished_delivery.previous_version_id,
    finished_delivery.interaction,
    finished_delivery.changed_at,
    finished_delivery.request_id,
    finished_delivery.trace_id,
    finished_delivery.matched_at,
    finished_delivery.state,
    finished_delivery.attempts,
    finished_delivery.next_attempt_at,
    finished_delivery.finished_at,
    finished_delivery.reason,
    NULL::uuid AS lease_token,
    NULL::timestamp with time zone AS lease_expires_at,
    finished_delivery.claims,
    finished_delivery.preamble_failures,
    finished_delivery.last_status,
    finished_delivery.replay,
    finished_delivery.notification,
    finished_delivery.event_number
   FROM fhir_outbox.finished_delivery;

--
-- Name: delivery_attempt; Type: TABLE; Schema: fhir_outbox; Owner: -
--

CREATE TABLE fhir_outbox.delivery_attempt (
    id bigint NOT NULL,
    delivery_id bigint NOT NULL,
    project_id uuid NOT NULL,
    subscription_id text NOT NULL,
    attempt integer NOT NULL,
    started_at timestamp with time zone NOT NULL,
    duration_ms integer NOT NULL,
    succeeded boolean NOT NULL,
    status integer,
    error text,
    response_body text,
    audit_event_id text
)
PARTITION BY RANGE (started_at);

--
-- Name: delivery_attempt_id_seq; Type: SEQUENCE; Schema: fhir_outbox; Owner: -
--

CREATE SEQUENCE fhir_outbox.delivery_attempt_id_seq
    START WITH 1
    INCREMENT BY 1
    NO MINVALUE
    NO MAXVALUE
    CACHE 1;

--
-- Name: delivery_attempt_id_seq; Type: SEQUENCE OWNED BY; Schema: fhir_outbox; Owner: -
--

ALTER SEQUENCE fhir_outbox.delivery_attempt_id_seq OWNED BY fhir_outbox.delivery_attempt.id;

--
-- Name: delivery_attempt_log; Type: VIEW; Schema: fhir_outbox; Owner: -
--

CREATE VIEW fhir_outbox.delivery_attempt_log AS
 SELECT a.id AS attempt_id,
    a.delivery_id,
    a.project_id,
    a.subscription_id,
    d.resource_type,
    d.resource_id,
    d.version_id,
    d.interaction,
    d.webhook_id,
    a.attempt,
    a.started_at,
    a.duration_ms,
    a.succeeded,
    a.status,
    a.error,
    a.response_body,
    a.audit_event_id
   FROM (fhir_outbox.delivery_attempt a
     JOIN fhir_outbox.delivery d ON ((d.id = a.delivery_id)));

--
-- Name: delivery_lane; Type: TABLE; Schema: fhir_outbox; Owner: -
--

CREATE TABLE fhir_outbox.delivery_lane (
    only_row boolean DEFAULT true NOT NULL,
    current smallint DEFAULT 0 NOT NULL,
    switched_at timestamp with time zone DEFAULT now() NOT NULL,
    switches bigint DEFAULT 0 NOT NULL,
    switched_xid xid8 NOT NULL,
    oldest_xmin xid,
    oldest_xmin_since timestamp with time zone,
    CONSTRAINT delivery_lane_current_check CHECK ((current = ANY (ARRAY[0, 1]))),
    CONSTRAINT delivery_lane_only_row_check CHECK (only_row)
);

--
-- Name: dispatcher_waiting; Type: TABLE; Schema: fhir_outbox; Owner: -
--

CREATE UNLOGGED TABLE fhir_outbox.dispatcher_waiting (
    listener uuid NOT NULL,
    backend_pid integer NOT NULL,
    since timestamp with time zone DEFAULT now() NOT NULL,
    waiting boolean DEFAULT true NOT NULL
)
WITH (fillfactor='10');

--
-- Name: endpoint_circuit; Type: TABLE; Schema: fhir_outbox; Owner: -
--

CREATE TABLE fhir_outbox.endpoint_circuit (
    project_id uuid NOT NULL,
    endpoint text NOT NULL,
    state text DEFAULT 'closed'::text NOT NULL,
    consecutive_failures integer DEFAULT 0 NOT NULL,
    openings integer DEFAULT 0 NOT NULL,
    opened_at timestamp with time zone,
    next_probe_at timestamp with time zone,
    last_failure text,
    last_failure_at timestamp with time zone,
    last_success_at timestamp with time zone,
    updated_at timestamp with time zone DEFAULT now() NOT NULL,
    allowance integer,
    CONSTRAINT endpoint_circuit_allowance_check CHECK ((allowance > 0)),
    CONSTRAINT endpoint_circuit_state_check CHECK ((state = ANY (ARRAY['closed'::text, 'open'::text, 'half_open'::text])))
);

--
-- Name: COLUMN endpoint_circuit.allowance; Type: COMMENT; Schema: fhir_outbox; Owner: -
--

COMMENT ON COLUMN fhir_outbox.endpoint_circuit.allowance IS 'Deliveries in progress allowed to this endpoint, when grown beyond the configured base; NULL: the base';

--
-- Name: resource; Type: TABLE; Schema: fhir_outbox; Owner: -
--

CREATE TABLE fhir_outbox.resource (
    project_id uuid NOT NULL,
    resource_type text NOT NULL,
    id text NOT NULL,
    version_id bigint NOT NULL,
    live_version_id bigint,
    deleted boolean NOT NULL,
    last_updated timestamp with time zone NOT NULL
);

--
-- Name: resource_version; Type: TABLE; Schema: fhir_outbox; Owner: -
--

CREATE TABLE fhir_outbox.resource_version (
    project_id uuid NOT NULL,
    resource_type text NOT NULL,
    id text NOT NULL,
    version_id bigint NOT NULL,
    deleted boolean NOT NULL,
    content jsonb,
    last_updated timestamp with time zone NOT NULL,
    author text,
    CONSTRAINT resource_version_check CHECK (((content IS NULL) = deleted))
);

--
-- Name: subscription_endpoint; Type: VIEW; Schema: fhir_outbox; Owner: -
--

CREATE VIEW fhir_outbox.subscription_endpoint AS
 SELECT r.project_id,
    r.id AS subscription_id,
    fhir_outbox.endpoint_origin((v.content #>> '{channel,endpoint}'::text[])) AS endpoint
   FROM (fhir_outbox.resource r
     JOIN fhir_outbox.resource_version v USING (project_id, resource_type, id, version_id))
  WHERE ((r.resource_type = 'Subscription'::text) AND (NOT r.deleted));

--
-- Name: endpoint_health; Type: VIEW; Schema: fhir_outbox; Owner: -
--

CREATE VIEW fhir_outbox.endpoint_health AS
 WITH endpoints AS (
         SELECT DISTINCT subscription_endpoint.project_id,
            subscription_endpoint.endpoint
           FROM fhir_outbox.subscription_endpoint
          WHERE (subscription_endpoint.endpoint IS NOT NULL)
        UNION
         SELECT endpoint_circuit.project_id,
            endpoint_circuit.endpoint
           FROM fhir_outbox.endpoint_circuit
        ), load AS (
         SELECT e_1.project_id,
            e_1.endpoint,
            (sum(d.in_flight))::bigint AS in_flight,
            (sum(d.pending))::bigint AS pending,
            count(*) AS subscriptions_waiting
           FROM (( SELECT x.project_id,
                    x.subscription_id,
                    count(*) FILTER (WHERE (x.state = 'in_flight'::text)) AS in_flight,
                    count(*) FILTER (WHERE (x.state = 'pending'::text)) AS pending
                   FROM ( SELECT unfinished_delivery.project_id,
                            unfinished_delivery.subscription_id,
                            'pending'::text AS state
                           FROM fhir_outbox.unfinished_delivery
                          WHERE (unfinished_delivery.state = 'pending'::text)
                        UNION ALL
                         SELECT unfinished_delivery.project_id,
                            unfinished_delivery.subscription_id,
                            'in_flight'::text
                           FROM fhir_outbox.unfinished_delivery
                          WHERE (unfinished_delivery.state = 'in_flight'::text)) x
                  GROUP BY x.project_id, x.subscription_id) d
             JOIN fhir_outbox.subscription_endpoint e_1 USING (project_id, subscription_id))
          GROUP BY e_1.project_id, e_1.endpoint
        )
 SELECT e.project_id,
    e.endpoint,
    COALESCE(c.state, 'closed'::text) AS state,
    COALESCE(c.consecutive_failures, 0) AS consecutive_failures,
    COALESCE(c.openings, 0) AS openings,
    c.opened_at,
    c.next_probe_at,
    c.last_failure,
    c.last_failure_at,
    c.last_success_at,
    COALESCE(l.in_flight, (0)::bigint) AS in_flight,
    COALESCE(l.pending, (0)::bigint) AS pending,
    c.allowance
   FROM ((endpoints e
     LEFT JOIN fhir_outbox.endpoint_circuit c USING (project_id, endpoint))
     LEFT JOIN load l USING (project_id, endpoint));

--
-- Name: outbox; Type: TABLE; Schema: fhir_outbox; Owner: -
--

CREATE TABLE fhir_outbox.outbox (
    seq bigint NOT NULL,
    project_id uuid NOT NULL,
    resource_type text NOT NULL,
    resource_id text NOT NULL,
    version_id bigint NOT NULL,
    previous_version_id bigint,
    interaction text NOT NULL,
    changed_at timestamp with time zone NOT NULL,
    request_id text NOT NULL,
    trace_id text NOT NULL,
    dispatched_at timestamp with time zone,
    dispatch_error text,
    resend boolean DEFAULT false NOT NULL,
    resend_subscription_id text,
    CONSTRAINT outbox_interaction_check CHECK ((interaction = ANY (ARRAY['create'::text, 'update'::text, 'delete'::text])))
);

--
-- Name: outbox_backlog; Type: VIEW; Schema: fhir_outbox; Owner: -
--

CREATE VIEW fhir_outbox.outbox_backlog AS
 SELECT outbox.project_id,
    count(*) AS undispatched,
    min(outbox.changed_at) AS oldest_changed_at,
    (now() - min(outbox.changed_at)) AS dispatch_lag
   FROM fhir_outbox.outbox
  WHERE (outbox.dispatched_at IS NULL)
  GROUP BY outbox.project_id;

--
-- Name: outbox_dispatch_error; Type: VIEW; Schema: fhir_outbox; Owner: -
--

CREATE VIEW fhir_outbox.outbox_dispatch_error AS
 SELECT outbox.seq,
    outbox.project_id,
    outbox.resource_type,
    outbox.resource_id,
    outbox.version_id,
    outbox.interaction,
    outbox.changed_at,
    outbox.dispatched_at,
    outbox.dispatch_error
   FROM fhir_outbox.outbox
  WHERE (outbox.dispatch_error IS NOT NULL);

--
-- Name: outbox_seq_seq; Type: SEQUENCE; Schema: fhir_outbox; Owner: -
--

ALTER TABLE fhir_outbox.outbox ALTER COLUMN seq ADD GENERATED ALWAYS AS IDENTITY (
    SEQUENCE NAME fhir_outbox.outbox_seq_seq
    START WITH 1
    INCREMENT BY 1
    NO MINVALUE
    NO MAXVALUE
    CACHE 1
);

--
-- Name: project; Type: TABLE; Schema: fhir_outbox; Owner: -
--

CREATE TABLE fhir_outbox.project (
    id uuid DEFAULT gen_random_uuid() NOT NULL,
    name text NOT NULL,
    settings jsonb DEFAULT '{}'::jsonb NOT NULL,
    created_at timestamp with time zone DEFAULT now() NOT NULL,
    server_scope boolean DEFAULT false NOT NULL,
    subscription_epoch bigint DEFAULT 0 NOT NULL,
    CONSTRAINT project_name_check CHECK ((name <> ''::text)),
    CONSTRAINT project_settings_check CHECK ((jsonb_typeof(settings) = 'object'::text))
);

--
-- Name: resource_type; Type: TABLE; Schema: fhir_outbox; Owner: -
--

CREATE TABLE fhir_outbox.resource_type (
    name text NOT NULL
);

--
-- Name: subscription_issue; Type: TABLE; Schema: fhir_outbox; Owner: -
--

CREATE TABLE fhir_outbox.subscription_issue (
    project_id uuid NOT NULL,
    subscription_id text NOT NULL,
    subscription_version bigint NOT NULL,
    kind text NOT NULL,
    message text NOT NULL,
    occurrences bigint DEFAULT 1 NOT NULL,
    first_seen timestamp with time zone DEFAULT now() NOT NULL,
    last_seen timestamp with time zone DEFAULT now() NOT NULL,
    CONSTRAINT subscription_issue_kind_check CHECK ((kind = ANY (ARRAY['unsupported'::text, 'invalid'::text, 'evaluation_error'::text, 'budget_exhausted'::text, 'endpoint_refused'::text, 'status_update_failed'::text])))
);

--
-- Name: subscription_pause; Type: TABLE; Schema: fhir_outbox; Owner: -
--

CREATE TABLE fhir_outbox.subscription_pause (
    project_id uuid NOT NULL,
    subscription_id text NOT NULL,
    paused_at timestamp with time zone DEFAULT now() NOT NULL
);

--
-- Name: subscription_delivery_status; Type: VIEW; Schema: fhir_outbox; Owner: -
--

CREATE VIEW fhir_outbox.subscription_delivery_status AS
 SELECT r.project_id,
    r.id AS subscription_id,
    (v.content ->> 'status'::text) AS status,
    ((v.content -> 'channel'::text) ->> 'type'::text) AS channel_type,
    (v.content ->> 'criteria'::text) AS criteria,
    (p.subscription_id IS NOT NULL) AS paused,
    COALESCE(u.pending, (0)::bigint) AS pending,
    COALESCE(u.in_flight, (0)::bigint) AS in_flight,
    COALESCE(f.succeeded, (0)::bigint) AS succeeded,
    COALESCE(f.skipped, (0)::bigint) AS skipped,
    COALESCE(f.failed, (0)::bigint) AS failed,
    u.oldest_undelivered_at,
    (now() - u.oldest_undelivered_at) AS oldest_undelivered_age,
    COALESCE(u.last_error, f.last_error) AS last_error,
    f.last_skip_reason,
    f.last_finished_at,
    COALESCE(i.issues, (0)::bigint) AS issues,
    i.suspended_reason,
    COALESCE(f.cancelled, (0)::bigint) AS cancelled
   FROM (((((fhir_outbox.resource r
     JOIN fhir_outbox.resource_version v USING (project_id, resource_type, id, version_id))
     LEFT JOIN fhir_outbox.subscription_pause p ON (((p.project_id = r.project_id) AND (p.subscription_id = r.id))))
     LEFT JOIN LATERAL ( SELECT count(*) FILTER (WHERE (x.state = 'pending'::text)) AS pending,
            count(*) FILTER (WHERE (x.state = 'in_flight'::text)) AS in_flight,
            min(x.changed_at) AS oldest_undelivered_at,
            (array_agg(x.reason ORDER BY x.id DESC) FILTER (WHERE (x.reason IS NOT NULL)))[1] AS last_error
           FROM ( SELECT unfinished_delivery.id,
                    unfinished_delivery.state,
                    unfinished_delivery.changed_at,
                    unfinished_delivery.reason
                   FROM fhir_outbox.unfinished_delivery
                  WHERE ((unfinished_delivery.state = 'pending'::text) AND (unfinished_delivery.project_id = r.project_id) AND (unfinished_delivery.subscription_id = r.id))
                UNION ALL
                 SELECT unfinished_delivery.id,
                    unfinished_delivery.state,
                    unfinished_delivery.changed_at,
                    NULL::text
                   FROM fhir_outbox.unfinished_delivery
                  WHERE ((unfinished_delivery.state = 'in_flight'::text) AND (unfinished_delivery.project_id = r.project_id) AND (unfinished_delivery.subscription_id = r.id))) x) u ON (true))
     LEFT JOIN LATERAL ( SELECT count(*) FILTER (WHERE (x.state = 'succeeded'::text)) AS succeeded,
            count(*) FILTER (WHERE (x.state = 'skipped'::text)) AS skipped,
            count(*) FILTER (WHERE (x.state = 'failed'::text)) AS failed,
            count(*) FILTER (WHERE (x.state = 'cancelled'::text)) AS cancelled,
            (array_agg(x.reason ORDER BY x.id DESC) FILTER (WHERE ((x.state = 'failed'::text) AND (x.reason IS NOT NULL))))[1] AS last_error,
            (array_agg(x.reason ORDER BY x.id DESC) FILTER (WHERE (x.state = 'skipped'::text)))[1] AS last_skip_reason,
            max(x.finished_at) AS last_finished_at
           FROM fhir_outbox.finished_delivery x
          WHERE ((x.project_id = r.project_id) AND (x.subscription_id = r.id))) f ON (true))
     LEFT JOIN LATERAL ( SELECT count(*) AS issues,
            min(s.message) FILTER (WHERE (s.kind = 'budget_exhausted'::text)) AS suspended_reason
           FROM fhir_outbox.subscription_issue s
          WHERE ((s.project_id = r.project_id) AND (s.subscription_id = r.id) AND (s.subscription_version = r.version_id))) i ON (true))
  WHERE ((r.resource_type = 'Subscription'::text) AND (NOT r.deleted));

--
-- Name: subscription_event_count; Type: TABLE; Schema: fhir_outbox; Owner: -
--

CREATE TABLE fhir_outbox.subscription_event_count (
    project_id uuid NOT NULL,
    subscription_id text NOT NULL,
    events_since_start bigint DEFAULT 0 NOT NULL,
    last_notification_at timestamp with time zone DEFAULT now() NOT NULL,
    CONSTRAINT subscription_event_count_events_since_start_check CHECK ((events_since_start >= 0))
);

--
-- Name: subscription_failure; Type: TABLE; Schema: fhir_outbox; Owner: -
--

CREATE TABLE fhir_outbox.subscription_failure (
    project_id uuid NOT NULL,
    subscription_id text NOT NULL,
    failed_at timestamp with time zone DEFAULT now() NOT NULL
);

--
-- Name: subscription_heartbeat; Type: TABLE; Schema: fhir_outbox; Owner: -
--

CREATE TABLE fhir_outbox.subscription_heartbeat (
    project_id uuid NOT NULL,
    subscription_id text NOT NULL,
    version_id bigint NOT NULL,
    last_updated timestamp with time zone NOT NULL,
    period interval NOT NULL
);

--
-- Name: subscription_topic; Type: TABLE; Schema: fhir_outbox; Owner: -
--

CREATE TABLE fhir_outbox.subscription_topic (
    project_id uuid NOT NULL,
    id text NOT NULL
);

--
-- Name: unfinished_delivery_lane0; Type: TABLE; Schema: fhir_outbox; Owner: -
--

CREATE TABLE fhir_outbox.unfinished_delivery_lane0 (
    id bigint DEFAULT nextval('fhir_outbox.delivery_id_seq'::regclass) NOT NULL,
    webhook_id uuid DEFAULT gen_random_uuid() NOT NULL,
    project_id uuid NOT NULL,
    subscription_id text NOT NULL,
    outbox_seq bigint NOT NULL,
    resource_project_id uuid NOT NULL,
    resource_type text NOT NULL,
    resource_id text NOT NULL,
    version_id bigint NOT NULL,
    previous_version_id bigint,
    interaction text NOT NULL,
    changed_at timestamp with time zone NOT NULL,
    request_id text NOT NULL,
    trace_id text NOT NULL,
    matched_at timestamp with time zone NOT NULL,
    state text DEFAULT 'pending'::text NOT NULL,
    attempts integer DEFAULT 0 NOT NULL,
    next_attempt_at timestamp with time zone DEFAULT now() NOT NULL,
    reason text,
    lease_token uuid,
    lease_expires_at timestamp with time zone,
    claims integer DEFAULT 0 NOT NULL,
    preamble_failures integer DEFAULT 0 NOT NULL,
    last_status integer,
    replay boolean DEFAULT false NOT NULL,
    lane smallint DEFAULT fhir_outbox.current_delivery_lane() NOT NULL,
    notification text,
    event_number bigint,
    CONSTRAINT unfinished_delivery_interaction_check CHECK ((interaction = ANY (ARRAY['create'::text, 'update'::text, 'delete'::text]))),
    CONSTRAINT unfinished_delivery_notification_check CHECK ((notification = ANY (ARRAY['handshake'::text, 'heartbeat'::text, 'event-notification'::text]))),
    CONSTRAINT unfinished_delivery_state_check CHECK ((state = ANY (ARRAY['pending'::text, 'in_flight'::text])))
)
WITH (fillfactor='80');

--
-- Name: unfinished_delivery_lane1; Type: TABLE; Schema: fhir_outbox; Owner: -
--

CREATE TABLE fhir_outbox.unfinished_delivery_lane1 (
    id bigint DEFAULT nextval('fhir_outbox.delivery_id_seq'::regclass) NOT NULL,
    webhook_id uuid DEFAULT gen_random_uuid() NOT NULL,
    project_id uuid NOT NULL,
    subscription_id text NOT NULL,
    outbox_seq bigint NOT NULL,
    resource_project_id uuid NOT NULL,
    resource_type text NOT NULL,
    resource_id text NOT NULL,
    version_id bigint NOT NULL,
    previous_version_id bigint,
    interaction text NOT NULL,
    changed_at timestamp with time zone NOT NULL,
    request_id text NOT NULL,
    trace_id text NOT NULL,
    matched_at timestamp with time zone NOT NULL,
    state text DEFAULT 'pending'::text NOT NULL,
    attempts integer DEFAULT 0 NOT NULL,
    next_attempt_at timestamp with time zone DEFAULT now() NOT NULL,
    reason text,
    lease_token uuid,
    lease_expires_at timestamp with time zone,
    claims integer DEFAULT 0 NOT NULL,
    preamble_failures integer DEFAULT 0 NOT NULL,
    last_status integer,
    replay boolean DEFAULT false NOT NULL,
    lane smallint DEFAULT fhir_outbox.current_delivery_lane() NOT NULL,
    notification text,
    event_number bigint,
    CONSTRAINT unfinished_delivery_interaction_check CHECK ((interaction = ANY (ARRAY['create'::text, 'update'::text, 'delete'::text]))),
    CONSTRAINT unfinished_delivery_notification_check CHECK ((notification = ANY (ARRAY['handshake'::text, 'heartbeat'::text, 'event-notification'::text]))),
    CONSTRAINT unfinished_delivery_state_check CHECK ((state = ANY (ARRAY['pending'::text, 'in_flight'::text])))
)
WITH (fillfactor='80');

--
-- Name: unfinished_delivery_lane0; Type: TABLE ATTACH; Schema: fhir_outbox; Owner: -
--

ALTER TABLE ONLY fhir_outbox.unfinished_delivery ATTACH PARTITION fhir_outbox.unfinished_delivery_lane0 FOR VALUES IN ('0');

--
-- Name: unfinished_delivery_lane1; Type: TABLE ATTACH; Schema: fhir_outbox; Owner: -
--

ALTER TABLE ONLY fhir_outbox.unfinished_delivery ATTACH PARTITION fhir_outbox.unfinished_delivery_lane1 FOR VALUES IN ('1');

--
-- Name: delivery_attempt id; Type: DEFAULT; Schema: fhir_outbox; Owner: -
--

ALTER TABLE ONLY fhir_outbox.delivery_attempt ALTER COLUMN id SET DEFAULT nextval('fhir_outbox.delivery_attempt_id_seq'::regclass);

--
-- Name: unfinished_delivery id; Type: DEFAULT; Schema: fhir_outbox; Owner: -
--

ALTER TABLE ONLY fhir_outbox.unfinished_delivery ALTER COLUMN id SET DEFAULT nextval('fhir_outbox.delivery_id_seq'::regclass);

--
-- Name: claim_cursor claim_cursor_pkey; Type: CONSTRAINT; Schema: fhir_outbox; Owner: -
--

ALTER TABLE ONLY fhir_outbox.claim_cursor
    ADD CONSTRAINT claim_cursor_pkey PRIMARY KEY (only_row);

--
-- Name: console_token console_token_pkey; Type: CONSTRAINT; Schema: fhir_outbox; Owner: -
--

ALTER TABLE ONLY fhir_outbox.console_token
    ADD CONSTRAINT console_token_pkey PRIMARY KEY (id);

--
-- Name: console_token console_token_secret_sha256_key; Type: CONSTRAINT; Schema: fhir_outbox; Owner: -
--

ALTER TABLE ONLY fhir_outbox.console_token
    ADD CONSTRAINT console_token_secret_sha256_key UNIQUE (secret_sha256);

--
-- Name: delivery_lane delivery_lane_pkey; Type: CONSTRAINT; Schema: fhir_outbox; Owner: -
--

ALTER TABLE ONLY fhir_outbox.delivery_lane
    ADD CONSTRAINT delivery_lane_pkey PRIMARY KEY (only_row);

--
-- Name: dispatcher_waiting dispatcher_waiting_pkey; Type: CONSTRAINT; Schema: fhir_outbox; Owner: -
--

ALTER TABLE ONLY fhir_outbox.dispatcher_waiting
    ADD CONSTRAINT dispatcher_waiting_pkey PRIMARY KEY (listener);

--
-- Name: endpoint_circuit endpoint_circuit_pkey; Type: CONSTRAINT; Schema: fhir_outbox; Owner: -
--

ALTER TABLE ONLY fhir_outbox.endpoint_circuit
    ADD CONSTRAINT endpoint_circuit_pkey PRIMARY KEY (project_id, endpoint);

--
-- Name: outbox outbox_pkey; Type: CONSTRAINT; Schema: fhir_outbox; Owner: -
--

ALTER TABLE ONLY fhir_outbox.outbox
    ADD CONSTRAINT outbox_pkey PRIMARY KEY (seq);

--
-- Name: project project_pkey; Type: CONSTRAINT; Schema: fhir_outbox; Owner: -
--

ALTER TABLE ONLY fhir_outbox.project
    ADD CONSTRAINT project_pkey PRIMARY KEY (id);

--
-- Name: resource resource_pkey; Type: CONSTRAINT; Schema: fhir_outbox; Owner: -
--

ALTER TABLE ONLY fhir_outbox.resource
    ADD CONSTRAINT resource_pkey PRIMARY KEY (project_id, resource_type, id);

--
-- Name: resource_type resource_type_pkey; Type: CONSTRAINT; Schema: fhir_outbox; Owner: -
--

ALTER TABLE ONLY fhir_outbox.resource_type
    ADD CONSTRAINT resource_type_pkey PRIMARY KEY (name);

--
-- Name: resource_version resource_version_pkey; Type: CONSTRAINT; Schema: fhir_outbox; Owner: -
--

ALTER TABLE ONLY fhir_outbox.resource_version
    ADD CONSTRAINT resource_version_pkey PRIMARY KEY (project_id, resource_type, id, version_id);

--
-- Name: subscription_event_count subscription_event_count_pkey; Type: CONSTRAINT; Schema: fhir_outbox; Owner: -
--

ALTER TABLE ONLY fhir_outbox.subscription_event_count
    ADD CONSTRAINT subscription_event_count_pkey PRIMARY KEY (project_id, subscription_id);

--
-- Name: subscription_heartbeat subscription_heartbeat_pkey; Type: CONSTRAINT; Schema: fhir_outbox; Owner: -
--

ALTER TABLE ONLY fhir_outbox.subscription_heartbeat
    ADD CONSTRAINT subscription_heartbeat_pkey PRIMARY KEY (project_id, subscription_id);

--
-- Name: subscription_issue subscription_issue_pkey; Type: CONSTRAINT; Schema: fhir_outbox; Owner: -
--

ALTER TABLE ONLY fhir_outbox.subscription_issue
    ADD CONSTRAINT subscription_issue_pkey PRIMARY KEY (project_id, subscription_id, subscription_version, kind, message);

--
-- Name: subscription_pause subscription_pause_pkey; Type: CONSTRAINT; Schema: fhir_outbox; Owner: -
--

ALTER TABLE ONLY fhir_outbox.subscription_pause
    ADD CONSTRAINT subscription_pause_pkey PRIMARY KEY (project_id, subscription_id);

--
-- Name: subscription_topic subscription_topic_pkey; Type: CONSTRAINT; Schema: fhir_outbox; Owner: -
--

ALTER TABLE ONLY fhir_outbox.subscription_topic
    ADD CONSTRAINT subscription_topic_pkey PRIMARY KEY (project_id, id);

--
-- Name: unfinished_delivery unfinished_delivery_pkey; Type: CONSTRAINT; Schema: fhir_outbox; Owner: -
--

ALTER TABLE ONLY fhir_outbox.unfinished_delivery
    ADD CONSTRAINT unfinished_delivery_pkey PRIMARY KEY (id, lane);

--
-- Name: unfinished_delivery_lane0 unfinished_delivery_lane0_pkey; Type: CONSTRAINT; Schema: fhir_outbox; Owner: -
--

ALTER TABLE ONLY fhir_outbox.unfinished_delivery_lane0
    ADD CONSTRAINT unfinished_delivery_lane0_pkey PRIMARY KEY (id, lane);

--
-- Name: unfinished_delivery_lane1 unfinished_delivery_lane1_pkey; Type: CONSTRAINT; Schema: fhir_outbox; Owner: -
--

ALTER TABLE ONLY fhir_outbox.unfinished_delivery_lane1
    ADD CONSTRAINT unfinished_delivery_lane1_pkey PRIMARY KEY (id, lane);

--
-- Name: audit_event_by_id; Type: INDEX; Schema: fhir_outbox; Owner: -
--

CREATE INDEX audit_event_by_id ON ONLY fhir_outbox.audit_event USING btree (id);

--
-- Name: delivery_attempt_by_delivery; Type: INDEX; Schema: fhir_outbox; Owner: -
--

CREATE INDEX delivery_attempt_by_delivery ON ONLY fhir_outbox.delivery_attempt USING btree (delivery_id);

--
-- Name: delivery_attempt_by_subscription; Type: INDEX; Schema: fhir_outbox; Owner: -
--

CREATE INDEX delivery_attempt_by_subscription ON ONLY fhir_outbox.delivery_attempt USING btree (project_id, subscription_id, started_at) INCLUDE (succeeded, duration_ms);

--
-- Name: delivery_attempt_failures; Type: INDEX; Schema: fhir_outbox; Owner: -
--

CREATE INDEX delivery_attempt_failures ON ONLY fhir_outbox.delivery_attempt USING btree (started_at) INCLUDE (project_id, subscription_id) WHERE (NOT succeeded);

--
-- Name: delivery_attempt_recent; Type: INDEX; Schema: fhir_outbox; Owner: -
--

CREATE INDEX delivery_attempt_recent ON ONLY fhir_outbox.delivery_attempt USING btree (started_at) INCLUDE (project_id, succeeded, duration_ms);

--
-- Name: delivery_due; Type: INDEX; Schema: fhir_outbox; Owner: -
--

CREATE INDEX delivery_due ON ONLY fhir_outbox.unfinished_delivery USING btree (next_attempt_at) WHERE (state = 'pending'::text);

--
-- Name: delivery_leased; Type: INDEX; Schema: fhir_outbox; Owner: -
--

CREATE INDEX delivery_leased ON ONLY fhir_outbox.unfinished_delivery USING btree (lease_expires_at) WHERE (state = 'in_flight'::text);

--
-- Name: delivery_queue; Type: INDEX; Schema: fhir_outbox; Owner: -
--

CREATE INDEX delivery_queue ON ONLY fhir_outbox.unfinished_delivery USING btree (project_id, subscription_id, next_attempt_at, id) WHERE (state = 'pending'::text);

--
-- Name: finished_delivery_by_change; Type: INDEX; Schema: fhir_outbox; Owner: -
--

CREATE INDEX finished_delivery_by_change ON ONLY fhir_outbox.finished_delivery USING btree (project_id, changed_at);

--
-- Name: finished_delivery_by_id; Type: INDEX; Schema: fhir_outbox; Owner: -
--

CREATE INDEX finished_delivery_by_id ON ONLY fhir_outbox.finished_delivery USING btree (id);

--
-- Name: finished_delivery_by_resource; Type: INDEX; Schema: fhir_outbox; Owner: -
--

CREATE INDEX finished_delivery_by_resource ON ONLY fhir_outbox.finished_delivery USING btree (project_id, resource_type, resource_id, id);

--
-- Name: finished_delivery_by_subscription; Type: INDEX; Schema: fhir_outbox; Owner: -
--

CREATE INDEX finished_delivery_by_subscription ON ONLY fhir_outbox.finished_delivery USING btree (project_id, subscription_id, id);

--
-- Name: finished_delivery_event; Type: INDEX; Schema: fhir_outbox; Owner: -
--

CREATE INDEX finished_delivery_event ON ONLY fhir_outbox.finished_delivery USING btree (project_id, subscription_id, event_number) WHERE (notification = 'event-notification'::text);

--
-- Name: finished_delivery_given_up; Type: INDEX; Schema: fhir_outbox; Owner: -
--

CREATE INDEX finished_delivery_given_up ON ONLY fhir_outbox.finished_delivery USING btree (project_id, id) WHERE (state = ANY (ARRAY['failed'::text, 'skipped'::text, 'cancelled'::text]));

--
-- Name: outbox_dispatched; Type: INDEX; Schema: fhir_outbox; Owner: -
--

CREATE INDEX outbox_dispatched ON fhir_outbox.outbox USING btree (dispatched_at) WHERE (dispatched_at IS NOT NULL);

--
-- Name: outbox_undispatched; Type: INDEX; Schema: fhir_outbox; Owner: -
--

CREATE INDEX outbox_undispatched ON fhir_outbox.outbox USING btree (seq) WHERE (dispatched_at IS NULL);

--
-- Name: outbox_with_dispatch_error; Type: INDEX; Schema: fhir_outbox; Owner: -
--

CREATE INDEX outbox_with_dispatch_error ON fhir_outbox.outbox USING btree (seq) WHERE (dispatch_error IS NOT NULL);

--
-- Name: resource_version_audit_event_age; Type: INDEX; Schema: fhir_outbox; Owner: -
--

CREATE INDEX resource_version_audit_event_age ON fhir_outbox.resource_version USING btree (last_updated) WHERE (resource_type = 'AuditEvent'::text);

--
-- Name: subscription_failure_by_subscription; Type: INDEX; Schema: fhir_outbox; Owner: -
--

CREATE INDEX subscription_failure_by_subscription ON fhir_outbox.subscription_failure USING btree (project_id, subscription_id, failed_at);

--
-- Name: unfinished_delivery_event; Type: INDEX; Schema: fhir_outbox; Owner: -
--

CREATE INDEX unfinished_delivery_event ON ONLY fhir_outbox.unfinished_delivery USING btree (project_id, subscription_id, event_number) WHERE (notification = 'event-notification'::text);

--
-- Name: unfinished_delivery_lane0_lease_expires_at_idx; Type: INDEX; Schema: fhir_outbox; Owner: -
--

CREATE INDEX unfinished_delivery_lane0_lease_expires_at_idx ON fhir_outbox.unfinished_delivery_lane0 USING btree (lease_expires_at) WHERE (state = 'in_flight'::text);

--
-- Name: unfinished_delivery_lane0_next_attempt_at_idx; Type: INDEX; Schema: fhir_outbox; Owner: -
--

CREATE INDEX unfinished_delivery_lane0_next_attempt_at_idx ON fhir_outbox.unfinished_delivery_lane0 USING btree (next_attempt_at) WHERE (state = 'pending'::text);

--
-- Name: unfinished_delivery_lane0_project_id_subscription_id_event__idx; Type: INDEX; Schema: fhir_outbox; Owner: -
--

CREATE INDEX unfinished_delivery_lane0_project_id_subscription_id_event__idx ON fhir_outbox.unfinished_delivery_lane0 USING btree (project_id, subscription_id, event_number) WHERE (notification = 'event-notification'::text);

--
-- Name: unfinished_delivery_lane0_project_id_subscription_id_next_a_idx; Type: INDEX; Schema: fhir_outbox; Owner: -
--

CREATE INDEX unfinished_delivery_lane0_project_id_subscription_id_next_a_idx ON fhir_outbox.unfinished_delivery_lane0 USING btree (project_id, subscription_id, next_attempt_at, id) WHERE (state = 'pending'::text);

--
-- Name: unfinished_delivery_lane1_lease_expires_at_idx; Type: INDEX; Schema: fhir_outbox; Owner: -
--

CREATE INDEX unfinished_delivery_lane1_lease_expires_at_idx ON fhir_outbox.unfinished_delivery_lane1 USING btree (lease_expires_at) WHERE (state = 'in_flight'::text);

--
-- Name: unfinished_delivery_lane1_next_attempt_at_idx; Type: INDEX; Schema: fhir_outbox; Owner: -
--

CREATE INDEX unfinished_delivery_lane1_next_attempt_at_idx ON fhir_outbox.unfinished_delivery_lane1 USING btree (next_attempt_at) WHERE (state = 'pending'::text);

--
-- Name: unfinished_delivery_lane1_project_id_subscription_id_event__idx; Type: INDEX; Schema: fhir_outbox; Owner: -
--

CREATE INDEX unfinished_delivery_lane1_project_id_subscription_id_event__idx ON fhir_outbox.unfinished_delivery_lane1 USING btree (project_id, subscription_id, event_number) WHERE (notification = 'event-notification'::text);

--
-- Name: unfinished_delivery_lane1_project_id_subscription_id_next_a_idx; Type: INDEX; Schema: fhir_outbox; Owner: -
--

CREATE INDEX unfinished_delivery_lane1_project_id_subscription_id_next_a_idx ON fhir_outbox.unfinished_delivery_lane1 USING btree (project_id, subscription_id, next_attempt_at, id) WHERE (state = 'pending'::text);

--
-- Name: unfinished_delivery_lane0_lease_expires_at_idx; Type: INDEX ATTACH; Schema: fhir_outbox; Owner: -
--

ALTER INDEX fhir_outbox.delivery_leased ATTACH PARTITION fhir_outbox.unfinished_delivery_lane0_lease_expires_at_idx;

--
-- Name: unfinished_delivery_lane0_next_attempt_at_idx; Type: INDEX ATTACH; Schema: fhir_outbox; Owner: -
--

ALTER INDEX fhir_outbox.delivery_due ATTACH PARTITION fhir_outbox.unfinished_delivery_lane0_next_attempt_at_idx;

--
-- Name: unfinished_delivery_lane0_pkey; Type: INDEX ATTACH; Schema: fhir_outbox; Owner: -
--

ALTER INDEX fhir_outbox.unfinished_delivery_pkey ATTACH PARTITION fhir_outbox.unfinished_delivery_lane0_pkey;

--
-- Name: unfinished_delivery_lane0_project_id_subscription_id_event__idx; Type: INDEX ATTACH; Schema: fhir_outbox; Owner: -
--

ALTER INDEX fhir_outbox.unfinished_delivery_event ATTACH PARTITION fhir_outbox.unfinished_delivery_lane0_project_id_subscription_id_event__idx;

--
-- Name: unfinished_delivery_lane0_project_id_subscription_id_next_a_idx; Type: INDEX ATTACH; Schema: fhir_outbox; Owner: -
--

ALTER INDEX fhir_outbox.delivery_queue ATTACH PARTITION fhir_outbox.unfinished_delivery_lane0_project_id_subscription_id_next_a_idx;

--
-- Name: unfinished_delivery_lane1_lease_expires_at_idx; Type: INDEX ATTACH; Schema: fhir_outbox; Owner: -
--

ALTER INDEX fhir_outbox.delivery_leased ATTACH PARTITION fhir_outbox.unfinished_delivery_lane1_lease_expires_at_idx;

--
-- Name: unfinished_delivery_lane1_next_attempt_at_idx; Type: INDEX ATTACH; Schema: fhir_outbox; Owner: -
--

ALTER INDEX fhir_outbox.delivery_due ATTACH PARTITION fhir_outbox.unfinished_delivery_lane1_next_attempt_at_idx;

--
-- Name: unfinished_delivery_lane1_pkey; Type: INDEX ATTACH; Schema: fhir_outbox; Owner: -
--

ALTER INDEX fhir_outbox.unfinished_delivery_pkey ATTACH PARTITION fhir_outbox.unfinished_delivery_lane1_pkey;

--
-- Name: unfinished_delivery_lane1_project_id_subscription_id_event__idx; Type: INDEX ATTACH; Schema: fhir_outbox; Owner: -
--

ALTER INDEX fhir_outbox.unfinished_delivery_event ATTACH PARTITION fhir_outbox.unfinished_delivery_lane1_project_id_subscription_id_event__idx;

--
-- Name: unfinished_delivery_lane1_project_id_subscription_id_next_a_idx; Type: INDEX ATTACH; Schema: fhir_outbox; Owner: -
--

ALTER INDEX fhir_outbox.delivery_queue ATTACH PARTITION fhir_outbox.unfinished_delivery_lane1_project_id_subscription_id_next_a_idx;

--
-- Name: delivery delivery_view_writes; Type: TRIGGER; Schema: fhir_outbox; Owner: -
--

CREATE TRIGGER delivery_view_writes INSTEAD OF INSERT OR DELETE OR UPDATE ON fhir_outbox.delivery FOR EACH ROW EXECUTE FUNCTION fhir_outbox.write_delivery_view();

--
-- Name: finished_delivery finished_delivery_handshake; Type: TRIGGER; Schema: fhir_outbox; Owner: -
--

CREATE TRIGGER finished_delivery_handshake AFTER INSERT ON fhir_outbox.finished_delivery FOR EACH ROW WHEN ((new.notification = 'handshake'::text)) EXECUTE FUNCTION fhir_outbox.handshake_finished();

--
-- Name: outbox outbox_wake_waiting_dispatchers; Type: TRIGGER; Schema: fhir_outbox; Owner: -
--

CREATE CONSTRAINT TRIGGER outbox_wake_waiting_dispatchers AFTER INSERT ON fhir_outbox.outbox DEFERRABLE INITIALLY DEFERRED FOR EACH ROW WHEN (
        CASE
            WHEN (current_setting('fhir_outbox.wakeup_queued'::text, true) IS DISTINCT FROM 'on'::text) THEN (set_config('fhir_outbox.wakeup_queued'::text, 'on'::text, true) = 'on'::text)
            ELSE false
        END) EXECUTE FUNCTION fhir_outbox.wake_waiting_dispatchers();

--
-- Name: project project_kept_while_it_has_resources; Type: TRIGGER; Schema: fhir_outbox; Owner: -
--

CREATE TRIGGER project_kept_while_it_has_resources BEFORE DELETE OR UPDATE OF id ON fhir_outbox.project FOR EACH ROW EXECUTE FUNCTION fhir_outbox.project_kept_while_it_has_resources();

--
-- Name: project project_kept_while_resources_exist; Type: TRIGGER; Schema: fhir_outbox; Owner: -
--

CREATE TRIGGER project_kept_while_resources_exist BEFORE TRUNCATE ON fhir_outbox.project FOR EACH STATEMENT EXECUTE FUNCTION fhir_outbox.project_kept_while_it_has_resources();

--
-- Name: project project_settings_checked; Type: TRIGGER; Schema: fhir_outbox; Owner: -
--

CREATE TRIGGER project_settings_checked BEFORE INSERT OR UPDATE OF settings ON fhir_outbox.project FOR EACH ROW EXECUTE FUNCTION fhir_outbox.check_project_settings();

--
-- Name: resource_version resource_version_immutable; Type: TRIGGER; Schema: fhir_outbox; Owner: -
--

CREATE TRIGGER resource_version_immutable BEFORE UPDATE ON fhir_outbox.resource_version FOR EACH ROW EXECUTE FUNCTION fhir_outbox.forbid_version_update();

--
-- Name: resource_version resource_version_subscription_heartbeat; Type: TRIGGER; Schema: fhir_outbox; Owner: -
--

CREATE TRIGGER resource_version_subscription_heartbeat AFTER INSERT ON fhir_outbox.resource_version FOR EACH ROW WHEN ((new.resource_type = 'Subscription'::text)) EXECUTE FUNCTION fhir_outbox.subscription_heartbeat_written();

--
-- Name: resource_version resource_version_topic_written; Type: TRIGGER; Schema: fhir_outbox; Owner: -
--

CREATE TRIGGER resource_version_topic_written AFTER INSERT ON fhir_outbox.resource_version FOR EACH ROW WHEN ((new.resource_type = 'Basic'::text)) EXECUTE FUNCTION fhir_outbox.topic_written();

--
-- Name: console_token console_token_project_id_fkey; Type: FK CONSTRAINT; Schema: fhir_outbox; Owner: -
--

ALTER TABLE ONLY fhir_outbox.console_token
    ADD CONSTRAINT console_token_project_id_fkey FOREIGN KEY (project_id) REFERENCES fhir_outbox.project(id);

--
-- PostgreSQL database dump complete
--

