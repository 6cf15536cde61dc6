-- Room on every page for updated rows: a checkpoint then updates its run (and its job row) in
-- place ("HOT": no new entry in every index) whenever no indexed column changed, which is most
-- checkpoints. Applies to pages written from now on.
ALTER TABLE runs SET (fillfactor = 70);
ALTER TABLE failover_jobs SET (fillfactor = 80);
