-- The demo's sample data (cargo xtask demo, and the compose quickstart's PostgreSQL).
CREATE TABLE customers (id int PRIMARY KEY, name text, email text, ssn text, card text);
INSERT INTO customers VALUES
  (1, 'Ada Lovelace', 'ada@example.com', '078-05-1120', '4111 1111 1111 1111'),
  (2, 'Alan Turing', 'alan@example.com', '219-09-9999', '5500 0000 0000 0004'),
  (3, 'Grace Hopper', 'grace@example.com', '457-55-5462', '3400 0000 0000 009');
