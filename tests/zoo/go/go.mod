module zooecho

go 1.24
