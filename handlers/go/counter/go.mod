module ordo/handlers/go/counter

go 1.24
