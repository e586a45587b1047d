-- Time per training run and per rendered image.
SELECT r.run_id, r.rank, r.status, round(r.wall_time_s, 1) AS train_s, round(r.steps_per_s, 1) AS steps_per_s,
       count(i.image_id) AS images, round(sum(i.render_s), 1) AS render_s,
       round(avg(i.render_s) * 1000, 1) AS ms_per_image
FROM runs AS r LEFT JOIN images AS i USING (run_id)
GROUP BY r.run_id, r.rank, r.status, r.wall_time_s, r.steps_per_s
ORDER BY r.run_id;
